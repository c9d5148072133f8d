# Included by every compiled module: the digest of the sources it was compiled from, which setup.py
# passes as the C macro CWSIM_SOURCE_DIGEST (cwsim.native.source_digest; cwsim.native.stale compares).

cdef extern from *:
    """
    #ifndef CWSIM_SOURCE_DIGEST
    #define CWSIM_SOURCE_DIGEST ""
    #endif
    """
    const char* CWSIM_SOURCE_DIGEST

SOURCE_DIGEST = CWSIM_SOURCE_DIGEST.decode()
