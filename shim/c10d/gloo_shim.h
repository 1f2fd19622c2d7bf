/*
 * gloo_shim.h: a plain C API over gloo's collectives (Debian's libgloo-dev: tcp transport, ring all-reduce,
 * broadcast, barrier), for the vista3d Rust crate's CPU process group.
 *
 * This shim is built as its own shared object, linked with libgloo.so.0, embedded in the vista3d binary and loaded
 * at run time with RTLD_DEEPBIND: libtorch_cpu.so exports a newer, incompatible copy of gloo's symbols, and deep
 * binding makes this object and libgloo resolve gloo's symbols to Debian's library instead of torch's. Nothing in
 * the vista3d binary links gloo, so machines without libgloo0 only lose the CPU backend.
 *
 * Rendezvous goes through the caller's key-value store (vista3d bridges it to libtorch's TCPStore), passed in as a
 * table of callbacks. Conventions: fallible calls return VG_OK (0) or VG_FAILED (-1) and write the reason to the
 * caller's VgError (which may be NULL). No C++ exception crosses this API. A context is used by one thread at a
 * time.
 */
#ifndef VISTA3D_GLOO_SHIM_H
#define VISTA3D_GLOO_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VG_OK 0
#define VG_FAILED -1
/** Capacity of VgError::message, including the terminating NUL. */
#define VG_ERROR_LEN 2048
/** Version of this API; the loader refuses a shim with another one. */
#define VG_API_VERSION 1

/** Element types of vg_allreduce_sum. */
#define VG_FLOAT32 0
#define VG_FLOAT64 1

#if defined(__GNUC__)
#define VG_API __attribute__((visibility("default")))
#else
#define VG_API
#endif

typedef struct VgError {
    char message[VG_ERROR_LEN];
} VgError;

/** The rendezvous store: each callback returns 0 on success, non-zero on failure (with a message in err). */
typedef struct VgStore {
    void* ctx;
    int (*set)(void* ctx, const char* key, const uint8_t* data, size_t len, VgError* err);
    /** Blocks until key exists; the value stays valid until the next call on ctx. */
    int (*get)(void* ctx, const char* key, const uint8_t** data, size_t* len, VgError* err);
    int (*wait)(void* ctx, const char* const* keys, size_t n, int64_t timeout_ms, VgError* err);
} VgStore;

typedef struct VgContext VgContext;

VG_API int vg_api_version(void);

/** Connects `size` processes in a full mesh of tcp pairs. The pairs listen on network interface `iface` when it is
 *  not empty (GLOO_SOCKET_IFNAME), else on `hostname`: this process's address that the others can reach (an IP or a
 *  name). `timeout_ms` bounds the rendezvous and every later collective. */
VG_API VgContext* vg_connect(const VgStore* store, int rank, int size, const char* hostname, const char* iface,
                             int64_t timeout_ms, VgError* err);
VG_API void vg_destroy(VgContext* ctx);

/** In-place sum over all ranks of `count` elements of `dtype` (ring all-reduce; every rank gets the same bits). */
VG_API int vg_allreduce_sum(VgContext* ctx, void* data, size_t count, int dtype, VgError* err);

/** Copies `bytes` bytes from rank `root`'s buffer into every other rank's. */
VG_API int vg_broadcast(VgContext* ctx, void* data, size_t bytes, int root, VgError* err);

VG_API int vg_barrier(VgContext* ctx, VgError* err);

#ifdef __cplusplus
}
#endif

#endif
