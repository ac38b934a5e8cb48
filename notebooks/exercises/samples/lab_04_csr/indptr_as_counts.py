# Returns the count of non-zeros per row as indptr, not the running offsets.

# %% to_csr
def to_csr(A):
    """A: 2-D numpy array. Return (data, indices, indptr) as numpy arrays."""
    rows, cols = np.nonzero(A)
    return A[rows, cols], cols, np.bincount(rows, minlength=A.shape[0])
