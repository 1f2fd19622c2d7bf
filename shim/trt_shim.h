/*
 * trt_shim.h: a plain C API over TensorRT's C++ builder and runtime, for the vista3d Rust crate.
 *
 * Nothing here links against TensorRT: the TensorRT factory functions (createInferBuilder_INTERNAL,
 * createInferRuntime_INTERNAL, createNvOnnxParser_INTERNAL) are resolved at run time by the caller (dlopen of
 * libnvinfer.so.N / libnvonnxparser.so.N) and passed in. The shim must be compiled against the headers of the same
 * TensorRT major version as the library it is used with (check trt_shim_header_version() against the library's
 * getInferLibVersion() before calling anything else).
 *
 * Conventions:
 * - Objects are opaque handles, created by *_create / *_deserialize and released by the matching *_destroy.
 *   A runtime must outlive its engines, and an engine its contexts.
 * - Fallible functions return TRT_SHIM_OK (0) or TRT_SHIM_FAILED (-1), or a handle that is NULL on failure; the
 *   reason is written to the caller's TrtShimError (which may be NULL).
 * - Every TensorRT error-level log message during a call makes that call fail, even when TensorRT itself reports
 *   success (TensorRT without a GPU logs an error and returns a non-null, unusable runtime).
 * - No C++ exception crosses this API.
 */
#ifndef VISTA3D_TRT_SHIM_H
#define VISTA3D_TRT_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Success. */
#define TRT_SHIM_OK 0
/** Failure: the reason is in the TrtShimError. */
#define TRT_SHIM_FAILED -1

/** The most dimensions a tensor has (TensorRT's Dims64::MAX_DIMS). */
#define TRT_SHIM_MAX_DIMS 8
/** Capacity of TrtShimError::message, including the terminating NUL. */
#define TRT_SHIM_ERROR_LEN 4096

/** Build precision: FP32 tensors with TF32 tensor cores allowed. */
#define TRT_SHIM_PRECISION_TF32 0
/** Build precision: FP16 kernels allowed (and TF32), normalization layers pinned to FP32. */
#define TRT_SHIM_PRECISION_FP16 1
/** Build precision: FP16 from a float16-exported model (FP16 weights, casts around FP32 normalizations): TensorRT 11
 *  takes the types from the model (strongly typed); TensorRT 10 builds it as TRT_SHIM_PRECISION_FP16. */
#define TRT_SHIM_PRECISION_FP16_MODEL 2

/** Optimisation profile selectors (TensorRT's OptProfileSelector). */
#define TRT_SHIM_PROFILE_MIN 0
#define TRT_SHIM_PROFILE_OPT 1
#define TRT_SHIM_PROFILE_MAX 2

/** Tensor data types (TensorRT's DataType values). */
#define TRT_SHIM_DTYPE_FLOAT 0
#define TRT_SHIM_DTYPE_HALF 1
#define TRT_SHIM_DTYPE_INT32 3
#define TRT_SHIM_DTYPE_INT64 8

/** TensorRT log severities (ILogger::Severity values). */
#define TRT_SHIM_SEVERITY_INTERNAL_ERROR 0
#define TRT_SHIM_SEVERITY_ERROR 1
#define TRT_SHIM_SEVERITY_WARNING 2
#define TRT_SHIM_SEVERITY_INFO 3
#define TRT_SHIM_SEVERITY_VERBOSE 4

/** An error message written by a failing call (NUL-terminated, truncated to fit). */
typedef struct TrtShimError {
    char message[TRT_SHIM_ERROR_LEN];
} TrtShimError;

/** Tensor dimensions (TensorRT's Dims64). */
typedef struct TrtShimDims {
    int32_t nb_dims;
    int64_t d[TRT_SHIM_MAX_DIMS];
} TrtShimDims;

/** createInferBuilder_INTERNAL / createInferRuntime_INTERNAL: (nvinfer1::ILogger*, NV_TENSORRT_VERSION). */
typedef void* (*TrtShimCreateInferFn)(void* logger, int32_t version);
/** createNvOnnxParser_INTERNAL: (nvinfer1::INetworkDefinition*, nvinfer1::ILogger*, NV_ONNX_PARSER_VERSION). */
typedef void* (*TrtShimCreateParserFn)(void* network, void* logger, int32_t version);
/** Receives every TensorRT log message at or above the object's minimum severity. */
typedef void (*TrtShimLogFn)(void* user, int32_t severity, const char* message);

typedef struct TrtShimBytes TrtShimBytes;
typedef struct TrtShimBuilder TrtShimBuilder;
typedef struct TrtShimRuntime TrtShimRuntime;
typedef struct TrtShimEngine TrtShimEngine;
typedef struct TrtShimContext TrtShimContext;

/** NV_TENSORRT_VERSION of the headers the shim was compiled with (major * 10000 + minor * 100 + patch). */
int32_t trt_shim_header_version(void);

/* ---- host memory returned by TensorRT (serialized engines, timing caches) ---- */

/** The bytes of a serialized blob. */
const void* trt_shim_bytes_data(const TrtShimBytes* bytes);
/** The size of a serialized blob in bytes. */
size_t trt_shim_bytes_size(const TrtShimBytes* bytes);
void trt_shim_bytes_destroy(TrtShimBytes* bytes);

/* ---- builder: ONNX file -> serialized engine ---- */

/**
 * Creates a builder, an (explicit batch) network, an ONNX parser with the NATIVE_INSTANCENORM flag and a builder
 * config. `log` (may be NULL) receives messages of severity <= `min_severity`.
 */
TrtShimBuilder* trt_shim_builder_create(TrtShimCreateInferFn create_builder, TrtShimCreateParserFn create_parser,
                                        TrtShimLogFn log, void* log_user, int32_t min_severity, TrtShimError* err);
void trt_shim_builder_destroy(TrtShimBuilder* builder);
/** Parses an ONNX file into the network; the error lists every parser error with its node. */
int32_t trt_shim_builder_parse_onnx(TrtShimBuilder* builder, const char* path, TrtShimError* err);
/** Number of network inputs (after parsing). */
int32_t trt_shim_builder_num_inputs(const TrtShimBuilder* builder);
/** Name (valid while the builder lives), dims (-1 for dynamic) and data type of network input `index`. */
int32_t trt_shim_builder_input(const TrtShimBuilder* builder, int32_t index, const char** name, TrtShimDims* dims,
                               int32_t* dtype, TrtShimError* err);
/** TRT_SHIM_PRECISION_TF32 or TRT_SHIM_PRECISION_FP16 (FP16 needs a weakly typed network: TensorRT < 11). */
int32_t trt_shim_builder_set_precision(TrtShimBuilder* builder, int32_t precision, TrtShimError* err);
/** Builder optimisation level 0..5 (TensorRT's default is 3). */
int32_t trt_shim_builder_set_optimization_level(TrtShimBuilder* builder, int32_t level, TrtShimError* err);
/** Sets min/opt/max dims of one input in the (single) optimisation profile. */
int32_t trt_shim_builder_set_profile_dims(TrtShimBuilder* builder, const char* input, const TrtShimDims* min,
                                          const TrtShimDims* opt, const TrtShimDims* max, TrtShimError* err);
/** Uses a timing cache: the serialized bytes of an earlier one, or a new empty cache when `size` is 0. */
int32_t trt_shim_builder_set_timing_cache(TrtShimBuilder* builder, const void* data, size_t size, TrtShimError* err);
/** Serializes the builder's timing cache (after a build it holds the new timings). */
TrtShimBytes* trt_shim_builder_serialize_timing_cache(TrtShimBuilder* builder, TrtShimError* err);
/** Builds the network with the profile and flags set so far into a serialized engine (a plan). */
TrtShimBytes* trt_shim_builder_build(TrtShimBuilder* builder, TrtShimError* err);

/* ---- runtime: plan -> engine -> execution context ---- */

TrtShimRuntime* trt_shim_runtime_create(TrtShimCreateInferFn create_runtime, TrtShimLogFn log, void* log_user,
                                        int32_t min_severity, TrtShimError* err);
void trt_shim_runtime_destroy(TrtShimRuntime* runtime);
TrtShimEngine* trt_shim_engine_deserialize(TrtShimRuntime* runtime, const void* data, size_t size,
                                           TrtShimError* err);
void trt_shim_engine_destroy(TrtShimEngine* engine);
/** Number of input and output tensors. */
int32_t trt_shim_engine_num_io(const TrtShimEngine* engine);
/** Name of I/O tensor `index` (valid while the engine lives), NULL when out of range. */
const char* trt_shim_engine_io_name(const TrtShimEngine* engine, int32_t index);
/** Whether `name` is an input (1) or output (0), its data type and dims (-1 for dynamic). */
int32_t trt_shim_engine_io_info(const TrtShimEngine* engine, const char* name, int32_t* is_input, int32_t* dtype,
                                TrtShimDims* dims, TrtShimError* err);
/** Dims of input `name` in optimisation profile 0 for TRT_SHIM_PROFILE_MIN/OPT/MAX. */
int32_t trt_shim_engine_profile_dims(const TrtShimEngine* engine, const char* name, int32_t selector,
                                     TrtShimDims* dims, TrtShimError* err);
TrtShimContext* trt_shim_context_create(TrtShimEngine* engine, TrtShimError* err);
void trt_shim_context_destroy(TrtShimContext* context);
int32_t trt_shim_context_set_input_shape(TrtShimContext* context, const char* name, const TrtShimDims* dims,
                                         TrtShimError* err);
/** Shape of a tensor once all input shapes are set. */
int32_t trt_shim_context_tensor_shape(const TrtShimContext* context, const char* name, TrtShimDims* dims,
                                      TrtShimError* err);
/** Device address of an input or output tensor. */
int32_t trt_shim_context_set_tensor_address(TrtShimContext* context, const char* name, void* address,
                                            TrtShimError* err);
/** enqueueV3 on a CUDA stream (cudaStream_t / CUstream); returns once the work is queued. */
int32_t trt_shim_context_enqueue(TrtShimContext* context, void* stream, TrtShimError* err);

/* ---- test hooks: factories that fail the way TensorRT does, without TensorRT ---- */

/** A factory that returns NULL. */
void* trt_shim_test_factory_null(void* logger, int32_t version);
/** A factory that logs an error through `logger` and returns a non-null pointer that must never be used. */
void* trt_shim_test_factory_logs_error(void* logger, int32_t version);
/** A parser factory that returns NULL. */
void* trt_shim_test_factory_null_parser(void* network, void* logger, int32_t version);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VISTA3D_TRT_SHIM_H */
