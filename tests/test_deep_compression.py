import numpy as np
import pytest
import scipy.sparse
import torch
from torch import nn

from chapter11.deep_compression import (
    HEADER_BITS,
    HuffmanCode,
    SharedLayer,
    assign_clusters,
    assign_clusters_loop,
    compress_layer,
    finetune_centroids,
    format_storage_table,
    huffman_decode,
    huffman_encode,
    kmeans_1d,
    linear_init,
    relative_offsets,
    relative_offsets_loop,
    share_weights,
    storage_table,
)
from chapter11.magnitude import prune_magnitude


def pruned_mlp(seed=0, sparsity=0.8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    prune_magnitude(model, sparsity, scope="layerwise")
    return model


# ---- k-means -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_assign_loop_equals_vectorised(seed):
    torch.manual_seed(seed)
    values = torch.randn(200)
    centroids = torch.linspace(-2, 2, 8)
    assert torch.equal(assign_clusters_loop(values, centroids), assign_clusters(values, centroids))
    # exact ties go to the lower index in both
    tie = torch.tensor([0.5, -0.5])
    assert assign_clusters_loop(tie, torch.tensor([0.0, 1.0, -1.0])).tolist() == assign_clusters(tie, torch.tensor([0.0, 1.0, -1.0])).tolist() == [0, 0]


def test_linear_init_spans_min_to_max():
    c = linear_init(torch.tensor([3.0, -1.0, 0.0]), 3)
    assert c.tolist() == [-1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="k"):
        linear_init(torch.ones(3), 0)


def test_kmeans_matches_sklearn_from_the_same_init():
    from sklearn.cluster import KMeans

    torch.manual_seed(0)
    values = torch.cat([torch.randn(300) * 0.1, torch.randn(100) * 0.5 + 1.0]).double().float()
    ours, assign = kmeans_1d(values, 8, iters=300)
    init = linear_init(values, 8).numpy().astype(np.float64).reshape(-1, 1)
    ref = KMeans(n_clusters=8, init=init, n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(values.double().numpy().reshape(-1, 1))
    assert np.allclose(np.sort(ours.numpy()), np.sort(ref.cluster_centers_.ravel()), atol=1e-5)
    # each centroid is the mean of its members
    for j in range(8):
        members = values[assign == j]
        if len(members):
            assert float(members.mean()) == pytest.approx(float(ours[j]), abs=1e-5)


def test_share_weights_keeps_zeros_and_uses_at_most_2_to_the_bits_values():
    model = pruned_mlp()
    zeros_before = [(m.weight == 0).clone() for m in (model[0], model[2])]
    shared = share_weights(model, bits=3)
    for layer, zeros in zip((model[0], model[2]), zeros_before):
        assert torch.equal(layer.weight == 0, zeros)
        assert len(torch.unique(layer.weight[layer.weight != 0])) <= 8
    assert shared["0.weight"].indices.numel() == int((~zeros_before[0]).sum())
    assert torch.equal(shared["0.weight"].weight(), model[0].weight.detach())
    with pytest.raises(ValueError, match="bits"):
        share_weights(pruned_mlp(), bits=0)


def test_finetune_centroids_keeps_sharing_and_lowers_loss():
    torch.manual_seed(1)
    X = torch.randn(256, 20)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    loader = [(X[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    model = pruned_mlp(2, sparsity=0.5)
    shared = share_weights(model, bits=2)
    bias_before = model[0].bias.detach().clone()
    losses = finetune_centroids(model, shared, loader, steps=60, lr=1e-2)
    assert len(losses) == 60
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert torch.equal(model[0].bias, bias_before)  # only centroids train
    for name, layer in shared.items():
        w = dict(model.named_parameters())[name]
        assert torch.equal(w.detach(), layer.weight())
        assert len(torch.unique(w[w != 0])) <= 4


# ---- Huffman ----------------------------------------------------------------


def test_huffman_textbook_example_is_optimal():
    # the classic six-symbol example: optimal cost 224 bits for 100 symbols
    freqs = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}
    symbols = [s for s, f in freqs.items() for _ in range(f)]
    code, data, nbits = huffman_encode(symbols)
    assert nbits == 224
    assert len(data) == 28
    assert huffman_decode(code, data, nbits) == symbols
    # prefix-free
    words = list(code.codes.values())
    assert not any(a != b and b.startswith(a) for a in words for b in words)


@pytest.mark.parametrize("seed", range(5))
def test_huffman_round_trip_random(seed):
    rng = np.random.default_rng(seed)
    symbols = rng.geometric(0.3, size=int(rng.integers(1, 3000))).tolist()
    code, data, nbits = huffman_encode(symbols)
    assert huffman_decode(code, data, nbits) == symbols
    # never worse than a fixed-width code over the same alphabet
    assert nbits <= len(symbols) * max(1, (max(symbols)).bit_length())


def test_huffman_single_symbol_and_errors():
    code, data, nbits = huffman_encode([7, 7, 7])
    assert nbits == 3 and huffman_decode(code, data, nbits) == [7, 7, 7]
    with pytest.raises(ValueError, match="alphabet"):
        code.encode([8])
    with pytest.raises(ValueError, match="symbols"):
        HuffmanCode.from_symbols([])
    with pytest.raises(ValueError, match="nbits"):
        code.decode(b"\x00", 9)


# ---- CSR offsets and storage -------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_relative_offsets_match_scipy_csr(seed):
    torch.manual_seed(seed)
    W = torch.randn(7, 11) * (torch.rand(7, 11) > 0.7)
    W[3] = 0  # an empty row
    a = relative_offsets_loop(W)
    b = relative_offsets(W)
    assert a == b
    row_ptr, offsets = b
    csr = scipy.sparse.csr_matrix(W.numpy())
    assert row_ptr == csr.indptr.tolist()
    cols = []
    for r in range(7):
        col = -1
        for j in range(row_ptr[r], row_ptr[r + 1]):
            col += offsets[j] + 1
            cols.append(col)
    assert cols == csr.indices.tolist()


def test_compressed_layer_round_trips_exactly():
    model = pruned_mlp(3)
    shared = share_weights(model, bits=4)
    for name, layer in shared.items():
        assert torch.equal(compress_layer(layer).decode(), layer.weight())


def test_storage_hand_computed():
    # 2x4 matrix, 3 kept weights, 1-bit sharing
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    layer = SharedLayer(torch.tensor([-0.5, 0.5]), torch.tensor([0, 1, 1]), mask, bits=1)
    row = storage_table({"fc": layer})[0]
    # offsets [0, 2, 1] -> width 2; row_ptr [0, 2, 3] -> 3 x 2 bits
    structure = HEADER_BITS + 6
    assert row.dense_bits == 32 * 8
    assert row.csr_bits == structure + 32 * 3 + 2 * 3
    assert row.shared_bits == structure + 1 * 3 + 32 * 2 + 2 * 3
    # Huffman: indices [0, 1, 1] -> 3 bits + table 2 x 5; offsets [0, 2, 1] -> 1+2+2 = 5 bits + table 3 x 5
    assert row.huffman_bits == structure + 32 * 2 + 3 + 10 + 5 + 15


def test_storage_table_totals_and_ratios():
    model = pruned_mlp(4, sparsity=0.9)
    shared = share_weights(model, bits=4)
    rows = storage_table(shared)
    total = rows[-1]
    assert total.name == "total"
    assert total.numel == 20 * 30 + 30 * 5
    assert total.dense_bits == 32 * total.numel
    assert total.huffman_bits == sum(r.huffman_bits for r in rows[:-1])
    csr_x, share_x, huff_x = total.ratios()
    assert 1 < csr_x < share_x
    text = format_storage_table(rows)
    assert "total" in text and "Huff" in text
