# Raw data pointers of numpy arrays, through numpy's C API. A typed memoryview made from an array
# costs a buffer request and its validation (hundreds of instructions), which the calls made per
# request and per step paid each time; these read the array's header. Included by the compiled
# modules that take arrays per call.

cimport numpy as cnp

cnp.import_array()


cdef inline bint _is(object a, int typenum) noexcept:
    return cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum \
        and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)


cdef inline long long* _i64(object a) except? NULL:
    """The data of ``a``, a C-contiguous int64 array (anything else: a TypeError)."""
    if not _is(a, cnp.NPY_INT64):
        raise TypeError(f"expected a C-contiguous int64 array, got {type(a).__name__}")
    return <long long*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int* _i32(object a) except? NULL:
    """The data of ``a``, a C-contiguous int32 array (anything else: a TypeError)."""
    if not _is(a, cnp.NPY_INT32):
        raise TypeError(f"expected a C-contiguous int32 array, got {type(a).__name__}")
    return <int*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline double* _f64(object a) except? NULL:
    """The data of ``a``, a C-contiguous float64 array (anything else: a TypeError)."""
    if not _is(a, cnp.NPY_FLOAT64):
        raise TypeError(f"expected a C-contiguous float64 array, got {type(a).__name__}")
    return <double*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t _size(object a) noexcept:
    """The number of elements of ``a``, an array checked by one of the above."""
    return cnp.PyArray_SIZE(<cnp.ndarray>a)
