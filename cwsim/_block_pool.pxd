# The compiled pool core's C-level surface, for the compiled KV cache manager (cwsim/_kv_cache_manager.pyx).

from cwsim._free_queue cimport FreeBlockQueue


cdef class PoolCore:
    cdef public Py_ssize_t num_blocks
    cdef public object score_fn
    cdef public bint growable
    cdef public object on_evict
    cdef public object on_release
    cdef public object on_unhash
    cdef public object references
    cdef public object ref
    cdef public object has_hash
    cdef public object hash_of
    cdef public object canonical
    cdef public object gen
    cdef public object unlisted
    cdef public Py_ssize_t num_unlisted
    cdef public dict cached
    cdef public dict _dups
    cdef public Py_ssize_t num_free_hashed
    cdef public Py_ssize_t num_evicted
    cdef public Py_ssize_t peak_in_use
    cdef public FreeBlockQueue queue
    cdef int[::1] _ref
    cdef unsigned char[::1] _has_hash
    cdef long long[::1] _hash_of
    cdef unsigned char[::1] _canonical
    cdef long long[::1] _gen
    cdef unsigned char[::1] _unlisted

    cdef int touch_hits(self, object hits, Py_ssize_t n_free) except -1
    cdef int cache_range(self, long long* table, Py_ssize_t lo, Py_ssize_t hi, object hashes, bint listed) except -1
    cdef object _hint_prefix(self, cand, gens)
    cdef int _release_ids(self, ids, bint table, request, now, reason) except -1
    cdef object _gens(self, blocks)
