/*
 * The two CUDA runtime types TensorRT's headers use, for building the shim without a CUDA toolkit. Added with
 * -idirafter, so a real cuda_runtime_api.h on the include path wins. The shim only passes these pointers through.
 */
#pragma once

typedef struct CUevent_st* cudaEvent_t;
typedef struct CUstream_st* cudaStream_t;
