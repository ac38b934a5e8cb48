# Cheat: lets scipy build the CSR arrays instead of writing it (right answers, so it is flagged rather than failed).

# %% to_csr
import scipy.sparse


def to_csr(A):
    """A: 2-D numpy array. Return (data, indices, indptr) as numpy arrays."""
    m = scipy.sparse.csr_array(A)
    return m.data, m.indices, m.indptr
