# The compiled free queue's C-level surface, for the compiled block pool (cwsim/_block_pool.pyx).

cdef class _Run:
    cdef public object key
    cdef public long long rid
    cdef readonly object ids  # (readonly: v points into it; set_ids changes both)
    cdef long long* v  # the data of ids (which holds it)
    cdef Py_ssize_t n  # len(ids)
    cdef public Py_ssize_t start
    cdef public Py_ssize_t live
    cdef int set_ids(self, ids) except -1


cdef class FreeBlockQueue:
    cdef public object run_of
    cdef long long[::1] _v_run_of
    cdef public dict _runs
    cdef public list _heap
    cdef long long _next_rid
    cdef long long _seq
    cdef public Py_ssize_t num_free_blocks

    cdef int _push(self, tuple key, ids) except -1
    cpdef int prepend(self, ids) except -1
    cpdef long long append(self, ids) except? -1
    cpdef int remove_ids(self, ids) except -1
    cdef int _lose(self, long long rid, Py_ssize_t cnt) except -1
    cdef _Run _front_run(self)
    cdef Py_ssize_t _pop_into(self, long long* out, Py_ssize_t n) except -1
    cpdef object pop(self, Py_ssize_t n)
