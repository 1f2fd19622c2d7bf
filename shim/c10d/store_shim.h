/*
 * store_shim.h: a plain C API over libtorch's c10d::TCPStore (the rendezvous store of torchrun and
 * torch.distributed), for the vista3d Rust crate.
 *
 * Compiled against the torch wheel's headers (include/ and include/torch/csrc/api/include) and linked with the same
 * libtorch_cpu / libc10 as tch, so the store speaks torchrun's protocol: a process can host it (rank 0 on
 * MASTER_PORT) or connect to one hosted elsewhere (rank 0's, or torchrun's agent store).
 *
 * Conventions (as shim/trt_shim.h): opaque handles, fallible calls return VS_OK (0) or VS_FAILED (-1) and write the
 * reason to the caller's VsError (which may be NULL); VS_TIMEOUT (-2) marks a wait that timed out. No C++ exception
 * crosses this API. A handle may be used from several threads (TCPStore serialises its requests).
 */
#ifndef VISTA3D_STORE_SHIM_H
#define VISTA3D_STORE_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VS_OK 0
#define VS_FAILED -1
#define VS_TIMEOUT -2
/** Capacity of VsError::message, including the terminating NUL. */
#define VS_ERROR_LEN 2048

typedef struct VsError {
    char message[VS_ERROR_LEN];
} VsError;

typedef struct VsStore VsStore;

/** Hosts (is_server != 0) or connects to a TCPStore at host:port. A server with wait_workers != 0 waits until
 *  num_workers processes (itself included) are connected. timeout_ms bounds connecting and every later request. */
VsStore* vs_store_create(const char* host, uint16_t port, int is_server, int num_workers, int wait_workers,
                         int64_t timeout_ms, VsError* err);
void vs_store_destroy(VsStore* store);

/** The port the store listens on or is connected to (useful with port 0). */
int vs_store_port(VsStore* store, uint16_t* port, VsError* err);

int vs_store_set(VsStore* store, const char* key, const uint8_t* data, size_t len, VsError* err);

/** Blocks until `key` exists (up to the store's timeout); the value is copied into a buffer allocated with
 *  malloc, to be released with vs_free. */
int vs_store_get(VsStore* store, const char* key, uint8_t** data, size_t* len, VsError* err);

/** Atomically adds `delta` to the integer stored at `key` (0 when absent) and returns the new value. */
int vs_store_add(VsStore* store, const char* key, int64_t delta, int64_t* value, VsError* err);

/** Sets *exists to 1 when every key exists, 0 otherwise; does not block. */
int vs_store_check(VsStore* store, const char* const* keys, size_t n, int* exists, VsError* err);

/** Blocks until every key exists; VS_TIMEOUT after timeout_ms. */
int vs_store_wait(VsStore* store, const char* const* keys, size_t n, int64_t timeout_ms, VsError* err);

/** Releases a buffer returned by vs_store_get. */
void vs_free(void* p);

#ifdef __cplusplus
}
#endif

#endif
