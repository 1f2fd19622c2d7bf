// trt_shim.cpp: the C API of trt_shim.h over TensorRT's C++ interfaces (see the header for the conventions).
//
// Compiled against the TensorRT headers found by build.rs; no TensorRT or CUDA symbol is referenced at link time
// (every TensorRT object comes from a factory function pointer passed in by the caller, and everything else is
// inline header code calling through those objects' virtual tables).

#include "trt_shim.h"

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace {

using nvinfer1::ILogger;
using Severity = nvinfer1::ILogger::Severity;

// Writes `message` into the caller's error (if any), truncated to fit.
void set_error(TrtShimError* err, const std::string& message) {
    if (err == nullptr) {
        return;
    }
    std::snprintf(err->message, sizeof(err->message), "%s", message.c_str());
}

// A logger that forwards messages to the caller and counts error-level messages since the last `begin()`.
// TensorRT may log from several threads, hence the mutex.
class CountingLogger final : public ILogger {
public:
    CountingLogger(TrtShimLogFn log, void* user, int32_t min_severity)
        : log_(log), user_(user), min_severity_(min_severity) {}

    void log(Severity severity, const char* msg) noexcept override {
        try {
            std::lock_guard<std::mutex> lock(mutex_);
            const auto level = static_cast<int32_t>(severity);
            if (level <= static_cast<int32_t>(Severity::kERROR)) {
                errors_ += 1;
                if (messages_.size() < 8) {
                    messages_.emplace_back(msg != nullptr ? msg : "(no message)");
                }
            }
            if (log_ != nullptr && level <= min_severity_) {
                log_(user_, level, msg != nullptr ? msg : "");
            }
        } catch (...) {
            // Never let an exception out of a TensorRT callback.
        }
    }

    // Starts a new call: forgets earlier errors.
    void begin() {
        std::lock_guard<std::mutex> lock(mutex_);
        errors_ = 0;
        messages_.clear();
    }

    // True when an error was logged since begin(); writes "<what>: <messages>" into `err`.
    bool failed(const char* what, TrtShimError* err) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (errors_ == 0) {
            return false;
        }
        std::string text = std::string(what) + ": TensorRT logged " + std::to_string(errors_) + " error(s)";
        for (const auto& m : messages_) {
            text += "; " + m;
        }
        set_error(err, text);
        return true;
    }

private:
    std::mutex mutex_;
    TrtShimLogFn log_;
    void* user_;
    int32_t min_severity_;
    int64_t errors_ = 0;
    std::vector<std::string> messages_;
};

nvinfer1::Dims to_trt(const TrtShimDims& d) {
    nvinfer1::Dims out{};
    out.nbDims = d.nb_dims;
    for (int32_t i = 0; i < d.nb_dims && i < TRT_SHIM_MAX_DIMS; ++i) {
        out.d[i] = d.d[i];
    }
    return out;
}

void from_trt(const nvinfer1::Dims& d, TrtShimDims* out) {
    std::memset(out, 0, sizeof(*out));
    out->nb_dims = d.nbDims;
    for (int32_t i = 0; i < d.nbDims && i < TRT_SHIM_MAX_DIMS; ++i) {
        out->d[i] = d.d[i];
    }
}

bool valid_dims(const TrtShimDims* d) {
    return d != nullptr && d->nb_dims >= 0 && d->nb_dims <= TRT_SHIM_MAX_DIMS;
}

// Runs `body` (returning TRT_SHIM_OK/FAILED), turning exceptions into errors.
template <typename F>
int32_t guarded(TrtShimError* err, const char* what, F&& body) noexcept {
    try {
        return body();
    } catch (const std::exception& e) {
        set_error(err, std::string(what) + ": " + e.what());
    } catch (...) {
        set_error(err, std::string(what) + ": unknown C++ exception");
    }
    return TRT_SHIM_FAILED;
}

// True when `object` was created with no error logged; otherwise writes the reason into `err`.
bool created(CountingLogger& logger, const char* what, const void* object, TrtShimError* err) {
    if (logger.failed(what, err)) {
        return false;
    }
    if (object == nullptr) {
        set_error(err, std::string(what) + " returned null");
        return false;
    }
    return true;
}

template <typename T>
void destroy(T*& p) {
    delete p;
    p = nullptr;
}

}  // namespace

struct TrtShimBytes {
    nvinfer1::IHostMemory* memory = nullptr;
};

struct TrtShimBuilder {
    explicit TrtShimBuilder(TrtShimLogFn log, void* user, int32_t min_severity) : logger(log, user, min_severity) {}
    ~TrtShimBuilder() {
        destroy(timing_cache);
        destroy(parser);
        destroy(config);
        destroy(network);
        destroy(builder);
    }
    CountingLogger logger;
    nvinfer1::IBuilder* builder = nullptr;
    nvinfer1::INetworkDefinition* network = nullptr;
    nvinfer1::IBuilderConfig* config = nullptr;
    nvonnxparser::IParser* parser = nullptr;
    nvinfer1::IOptimizationProfile* profile = nullptr;  // owned by the builder
    nvinfer1::ITimingCache* timing_cache = nullptr;
    bool parsed = false;
};

struct TrtShimRuntime {
    explicit TrtShimRuntime(TrtShimLogFn log, void* user, int32_t min_severity) : logger(log, user, min_severity) {}
    ~TrtShimRuntime() { destroy(runtime); }
    CountingLogger logger;
    nvinfer1::IRuntime* runtime = nullptr;
};

struct TrtShimEngine {
    ~TrtShimEngine() { destroy(engine); }
    CountingLogger* logger = nullptr;  // the runtime's
    nvinfer1::ICudaEngine* engine = nullptr;
};

struct TrtShimContext {
    ~TrtShimContext() { destroy(context); }
    CountingLogger* logger = nullptr;  // the runtime's
    nvinfer1::IExecutionContext* context = nullptr;
};

extern "C" {

int32_t trt_shim_header_version(void) { return static_cast<int32_t>(NV_TENSORRT_VERSION); }

const void* trt_shim_bytes_data(const TrtShimBytes* bytes) {
    return bytes != nullptr && bytes->memory != nullptr ? bytes->memory->data() : nullptr;
}

size_t trt_shim_bytes_size(const TrtShimBytes* bytes) {
    return bytes != nullptr && bytes->memory != nullptr ? bytes->memory->size() : 0;
}

void trt_shim_bytes_destroy(TrtShimBytes* bytes) {
    if (bytes != nullptr) {
        destroy(bytes->memory);
        delete bytes;
    }
}

// ---- builder ----

TrtShimBuilder* trt_shim_builder_create(TrtShimCreateInferFn create_builder, TrtShimCreateParserFn create_parser,
                                        TrtShimLogFn log, void* log_user, int32_t min_severity, TrtShimError* err) {
    if (create_builder == nullptr || create_parser == nullptr) {
        set_error(err, "trt_shim_builder_create: a factory function pointer is null");
        return nullptr;
    }
    TrtShimBuilder* b = nullptr;
    const int32_t status = guarded(err, "creating the TensorRT builder", [&]() {
        b = new TrtShimBuilder(log, log_user, min_severity);
        b->logger.begin();
        void* raw = create_builder(static_cast<ILogger*>(&b->logger), NV_TENSORRT_VERSION);
        if (b->logger.failed("createInferBuilder", err)) {
            return TRT_SHIM_FAILED;  // a pointer returned with an error logged is not usable: never touch it
        }
        if (raw == nullptr) {
            set_error(err, "createInferBuilder returned null (no usable CUDA device, or a TensorRT version mismatch)");
            return TRT_SHIM_FAILED;
        }
        b->builder = static_cast<nvinfer1::IBuilder*>(raw);
        b->network = b->builder->createNetworkV2(0U);
        if (!created(b->logger, "createNetworkV2", b->network, err)) {
            return TRT_SHIM_FAILED;
        }
        b->config = b->builder->createBuilderConfig();
        if (!created(b->logger, "createBuilderConfig", b->config, err)) {
            return TRT_SHIM_FAILED;
        }
        void* parser = create_parser(static_cast<void*>(b->network), static_cast<ILogger*>(&b->logger),
                                     NV_ONNX_PARSER_VERSION);
        if (b->logger.failed("createNvOnnxParser", err)) {
            return TRT_SHIM_FAILED;
        }
        if (parser == nullptr) {
            set_error(err, "createNvOnnxParser returned null (libnvonnxparser of another TensorRT version?)");
            return TRT_SHIM_FAILED;
        }
        b->parser = static_cast<nvonnxparser::IParser*>(parser);
        b->parser->setFlag(nvonnxparser::OnnxParserFlag::kNATIVE_INSTANCENORM);
        return TRT_SHIM_OK;
    });
    if (status != TRT_SHIM_OK) {
        delete b;  // holds only objects created without an error (the factory's result is kept only then)
        return nullptr;
    }
    return b;
}

void trt_shim_builder_destroy(TrtShimBuilder* builder) { delete builder; }

int32_t trt_shim_builder_parse_onnx(TrtShimBuilder* b, const char* path, TrtShimError* err) {
    if (b == nullptr || path == nullptr) {
        set_error(err, "trt_shim_builder_parse_onnx: null argument");
        return TRT_SHIM_FAILED;
    }
    if (b->parsed) {
        set_error(err, "trt_shim_builder_parse_onnx: this builder already parsed a model");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "parsing ONNX", [&]() {
        b->logger.begin();
        const bool ok = b->parser->parseFromFile(path, static_cast<int>(Severity::kWARNING));
        std::string text;
        for (int32_t i = 0; i < b->parser->getNbErrors(); ++i) {
            const nvonnxparser::IParserError* e = b->parser->getError(i);
            text += "; node " + std::to_string(e->node());
            if (e->nodeName() != nullptr && e->nodeName()[0] != '\0') {
                text += std::string(" '") + e->nodeName() + "'";
            }
            if (e->nodeOperator() != nullptr && e->nodeOperator()[0] != '\0') {
                text += std::string(" (") + e->nodeOperator() + ")";
            }
            text += std::string(": ") + (e->desc() != nullptr ? e->desc() : "");
        }
        if (!ok || !text.empty()) {
            set_error(err, std::string("TensorRT's ONNX parser rejected ") + path + text);
            return TRT_SHIM_FAILED;
        }
        if (b->logger.failed((std::string("parsing ") + path).c_str(), err)) {
            return TRT_SHIM_FAILED;
        }
        b->parsed = true;
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_builder_num_inputs(const TrtShimBuilder* b) {
    return b != nullptr && b->network != nullptr ? b->network->getNbInputs() : 0;
}

int32_t trt_shim_builder_input(const TrtShimBuilder* b, int32_t index, const char** name, TrtShimDims* dims,
                               int32_t* dtype, TrtShimError* err) {
    if (b == nullptr || name == nullptr || dims == nullptr || dtype == nullptr) {
        set_error(err, "trt_shim_builder_input: null argument");
        return TRT_SHIM_FAILED;
    }
    if (index < 0 || index >= b->network->getNbInputs()) {
        set_error(err, "trt_shim_builder_input: index " + std::to_string(index) + " out of range");
        return TRT_SHIM_FAILED;
    }
    nvinfer1::ITensor* t = b->network->getInput(index);
    *name = t->getName();
    from_trt(t->getDimensions(), dims);
    *dtype = static_cast<int32_t>(t->getType());
    return TRT_SHIM_OK;
}

int32_t trt_shim_builder_set_precision(TrtShimBuilder* b, int32_t precision, TrtShimError* err) {
    if (b == nullptr) {
        set_error(err, "trt_shim_builder_set_precision: null builder");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting the precision", [&]() {
        b->logger.begin();
        b->config->setFlag(nvinfer1::BuilderFlag::kTF32);
#if NV_TENSORRT_MAJOR >= 11
        if (precision == TRT_SHIM_PRECISION_FP16_MODEL) {
            // Strongly typed (always, in TensorRT 11): the float16 model's types are the engine's precision.
            return b->logger.failed("setting the precision", err) ? TRT_SHIM_FAILED : TRT_SHIM_OK;
        }
#endif
        if (precision == TRT_SHIM_PRECISION_FP16 || precision == TRT_SHIM_PRECISION_FP16_MODEL) {
#if NV_TENSORRT_MAJOR < 11
            // As MONAI's trt_compile: FP16 kernels allowed, normalization computed in FP32, constraints obeyed.
            b->config->setFlag(nvinfer1::BuilderFlag::kFP16);
            b->config->setFlag(nvinfer1::BuilderFlag::kOBEY_PRECISION_CONSTRAINTS);
            for (int32_t i = 0; i < b->network->getNbLayers(); ++i) {
                nvinfer1::ILayer* layer = b->network->getLayer(i);
                if (layer->getType() == nvinfer1::LayerType::kNORMALIZATION) {
                    layer->setPrecision(nvinfer1::DataType::kFLOAT);
                    for (int32_t o = 0; o < layer->getNbOutputs(); ++o) {
                        layer->setOutputType(o, nvinfer1::DataType::kFLOAT);
                    }
                }
            }
#else
            set_error(err, "TensorRT " + std::to_string(NV_TENSORRT_MAJOR) +
                               " builds strongly typed networks only (no FP16 builder flag): an FP16 engine needs "
                               "the float16 ONNX export (encoder_fp16.onnx, class_head_fp16.onnx): re-run "
                               "`vista3d export-onnx`, or build TF32 engines instead");
            return TRT_SHIM_FAILED;
#endif
        } else if (precision != TRT_SHIM_PRECISION_TF32) {
            set_error(err, "unknown precision " + std::to_string(precision));
            return TRT_SHIM_FAILED;
        }
        return b->logger.failed("setting the precision", err) ? TRT_SHIM_FAILED : TRT_SHIM_OK;
    });
}

int32_t trt_shim_builder_set_optimization_level(TrtShimBuilder* b, int32_t level, TrtShimError* err) {
    if (b == nullptr || level < 0 || level > 5) {
        set_error(err, "trt_shim_builder_set_optimization_level: null builder or level outside 0..5");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting the optimisation level", [&]() {
        b->logger.begin();
        b->config->setBuilderOptimizationLevel(level);
        return b->logger.failed("setBuilderOptimizationLevel", err) ? TRT_SHIM_FAILED : TRT_SHIM_OK;
    });
}

int32_t trt_shim_builder_set_profile_dims(TrtShimBuilder* b, const char* input, const TrtShimDims* min,
                                          const TrtShimDims* opt, const TrtShimDims* max, TrtShimError* err) {
    if (b == nullptr || input == nullptr || !valid_dims(min) || !valid_dims(opt) || !valid_dims(max)) {
        set_error(err, "trt_shim_builder_set_profile_dims: null argument or bad dims");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting the optimisation profile", [&]() {
        b->logger.begin();
        if (b->profile == nullptr) {
            b->profile = b->builder->createOptimizationProfile();
            if (b->profile == nullptr) {
                set_error(err, "createOptimizationProfile returned null");
                return TRT_SHIM_FAILED;
            }
        }
        using nvinfer1::OptProfileSelector;
        const bool ok = b->profile->setDimensions(input, OptProfileSelector::kMIN, to_trt(*min)) &&
                        b->profile->setDimensions(input, OptProfileSelector::kOPT, to_trt(*opt)) &&
                        b->profile->setDimensions(input, OptProfileSelector::kMAX, to_trt(*max));
        if (b->logger.failed((std::string("profile of input '") + input + "'").c_str(), err)) {
            return TRT_SHIM_FAILED;
        }
        if (!ok) {
            set_error(err, std::string("TensorRT rejected the profile of input '") + input +
                               "' (need min <= opt <= max and the input's rank)");
            return TRT_SHIM_FAILED;
        }
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_builder_set_timing_cache(TrtShimBuilder* b, const void* data, size_t size, TrtShimError* err) {
    if (b == nullptr || (data == nullptr && size != 0)) {
        set_error(err, "trt_shim_builder_set_timing_cache: null argument");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting the timing cache", [&]() {
        b->logger.begin();
        nvinfer1::ITimingCache* cache = b->config->createTimingCache(size == 0 ? nullptr : data, size);
        if (b->logger.failed("createTimingCache", err)) {
            return TRT_SHIM_FAILED;
        }
        if (cache == nullptr) {
            set_error(err, "createTimingCache returned null (corrupt or foreign timing cache)");
            return TRT_SHIM_FAILED;
        }
        if (!b->config->setTimingCache(*cache, false) || b->logger.failed("setTimingCache", err)) {
            delete cache;
            set_error(err, "the timing cache does not match this TensorRT version or GPU");
            return TRT_SHIM_FAILED;
        }
        destroy(b->timing_cache);
        b->timing_cache = cache;
        return TRT_SHIM_OK;
    });
}

TrtShimBytes* trt_shim_builder_serialize_timing_cache(TrtShimBuilder* b, TrtShimError* err) {
    if (b == nullptr) {
        set_error(err, "trt_shim_builder_serialize_timing_cache: null builder");
        return nullptr;
    }
    TrtShimBytes* out = nullptr;
    guarded(err, "serializing the timing cache", [&]() {
        b->logger.begin();
        const nvinfer1::ITimingCache* cache = b->config->getTimingCache();
        if (cache == nullptr) {
            set_error(err, "the builder has no timing cache");
            return TRT_SHIM_FAILED;
        }
        nvinfer1::IHostMemory* memory = cache->serialize();
        if (!created(b->logger, "ITimingCache::serialize", memory, err)) {
            delete memory;
            return TRT_SHIM_FAILED;
        }
        out = new TrtShimBytes{memory};
        return TRT_SHIM_OK;
    });
    return out;
}

TrtShimBytes* trt_shim_builder_build(TrtShimBuilder* b, TrtShimError* err) {
    if (b == nullptr) {
        set_error(err, "trt_shim_builder_build: null builder");
        return nullptr;
    }
    if (!b->parsed) {
        set_error(err, "trt_shim_builder_build: no ONNX model parsed");
        return nullptr;
    }
    TrtShimBytes* out = nullptr;
    guarded(err, "building the engine", [&]() {
        b->logger.begin();
        if (b->profile != nullptr && b->config->getNbOptimizationProfiles() == 0) {
            const int32_t index = b->config->addOptimizationProfile(b->profile);
            if (b->logger.failed("addOptimizationProfile", err)) {
                return TRT_SHIM_FAILED;
            }
            if (index < 0) {
                set_error(err, "TensorRT rejected the optimisation profile (a dynamic input without dims?)");
                return TRT_SHIM_FAILED;
            }
        }
        nvinfer1::IHostMemory* plan = b->builder->buildSerializedNetwork(*b->network, *b->config);
        if (!created(b->logger, "buildSerializedNetwork", plan, err)) {
            delete plan;
            return TRT_SHIM_FAILED;
        }
        if (plan->size() == 0) {
            delete plan;
            set_error(err, "buildSerializedNetwork returned an empty engine");
            return TRT_SHIM_FAILED;
        }
        out = new TrtShimBytes{plan};
        return TRT_SHIM_OK;
    });
    return out;
}

// ---- runtime ----

TrtShimRuntime* trt_shim_runtime_create(TrtShimCreateInferFn create_runtime, TrtShimLogFn log, void* log_user,
                                        int32_t min_severity, TrtShimError* err) {
    if (create_runtime == nullptr) {
        set_error(err, "trt_shim_runtime_create: the factory function pointer is null");
        return nullptr;
    }
    TrtShimRuntime* r = nullptr;
    const int32_t status = guarded(err, "creating the TensorRT runtime", [&]() {
        r = new TrtShimRuntime(log, log_user, min_severity);
        r->logger.begin();
        void* raw = create_runtime(static_cast<ILogger*>(&r->logger), NV_TENSORRT_VERSION);
        if (r->logger.failed("createInferRuntime", err)) {
            return TRT_SHIM_FAILED;  // never touch a pointer returned with an error logged
        }
        if (raw == nullptr) {
            set_error(err, "createInferRuntime returned null (no usable CUDA device, or a TensorRT version mismatch)");
            return TRT_SHIM_FAILED;
        }
        r->runtime = static_cast<nvinfer1::IRuntime*>(raw);
        return TRT_SHIM_OK;
    });
    if (status != TRT_SHIM_OK) {
        delete r;  // r->runtime is only set for a usable runtime
        return nullptr;
    }
    return r;
}

void trt_shim_runtime_destroy(TrtShimRuntime* runtime) { delete runtime; }

TrtShimEngine* trt_shim_engine_deserialize(TrtShimRuntime* r, const void* data, size_t size, TrtShimError* err) {
    if (r == nullptr || data == nullptr || size == 0) {
        set_error(err, "trt_shim_engine_deserialize: null runtime or empty plan");
        return nullptr;
    }
    TrtShimEngine* out = nullptr;
    guarded(err, "deserializing the engine", [&]() {
        r->logger.begin();
        nvinfer1::ICudaEngine* engine = r->runtime->deserializeCudaEngine(data, size);
        if (r->logger.failed("deserializeCudaEngine", err)) {
            delete engine;
            return TRT_SHIM_FAILED;
        }
        if (engine == nullptr) {
            set_error(err, "deserializeCudaEngine returned null (corrupt plan, or built by another TensorRT/GPU)");
            return TRT_SHIM_FAILED;
        }
        out = new TrtShimEngine{&r->logger, engine};
        return TRT_SHIM_OK;
    });
    return out;
}

void trt_shim_engine_destroy(TrtShimEngine* engine) { delete engine; }

int32_t trt_shim_engine_num_io(const TrtShimEngine* e) {
    return e != nullptr ? e->engine->getNbIOTensors() : 0;
}

const char* trt_shim_engine_io_name(const TrtShimEngine* e, int32_t index) {
    if (e == nullptr || index < 0 || index >= e->engine->getNbIOTensors()) {
        return nullptr;
    }
    return e->engine->getIOTensorName(index);
}

int32_t trt_shim_engine_io_info(const TrtShimEngine* e, const char* name, int32_t* is_input, int32_t* dtype,
                                TrtShimDims* dims, TrtShimError* err) {
    if (e == nullptr || name == nullptr || is_input == nullptr || dtype == nullptr || dims == nullptr) {
        set_error(err, "trt_shim_engine_io_info: null argument");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "querying an engine tensor", [&]() {
        const nvinfer1::TensorIOMode mode = e->engine->getTensorIOMode(name);
        if (mode == nvinfer1::TensorIOMode::kNONE) {
            set_error(err, std::string("the engine has no input or output named '") + name + "'");
            return TRT_SHIM_FAILED;
        }
        *is_input = mode == nvinfer1::TensorIOMode::kINPUT ? 1 : 0;
        *dtype = static_cast<int32_t>(e->engine->getTensorDataType(name));
        from_trt(e->engine->getTensorShape(name), dims);
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_engine_profile_dims(const TrtShimEngine* e, const char* name, int32_t selector, TrtShimDims* dims,
                                     TrtShimError* err) {
    if (e == nullptr || name == nullptr || dims == nullptr || selector < 0 || selector > 2) {
        set_error(err, "trt_shim_engine_profile_dims: null argument or bad selector");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "querying the engine's profile", [&]() {
        if (e->engine->getNbOptimizationProfiles() < 1) {
            set_error(err, "the engine has no optimisation profile");
            return TRT_SHIM_FAILED;
        }
        from_trt(e->engine->getProfileShape(name, 0, static_cast<nvinfer1::OptProfileSelector>(selector)), dims);
        return TRT_SHIM_OK;
    });
}

TrtShimContext* trt_shim_context_create(TrtShimEngine* e, TrtShimError* err) {
    if (e == nullptr) {
        set_error(err, "trt_shim_context_create: null engine");
        return nullptr;
    }
    TrtShimContext* out = nullptr;
    guarded(err, "creating an execution context", [&]() {
        e->logger->begin();
        nvinfer1::IExecutionContext* context = e->engine->createExecutionContext();
        if (e->logger->failed("createExecutionContext", err)) {
            delete context;
            return TRT_SHIM_FAILED;
        }
        if (context == nullptr) {
            set_error(err, "createExecutionContext returned null (out of GPU memory?)");
            return TRT_SHIM_FAILED;
        }
        out = new TrtShimContext{e->logger, context};
        return TRT_SHIM_OK;
    });
    return out;
}

void trt_shim_context_destroy(TrtShimContext* context) { delete context; }

int32_t trt_shim_context_set_input_shape(TrtShimContext* c, const char* name, const TrtShimDims* dims,
                                         TrtShimError* err) {
    if (c == nullptr || name == nullptr || !valid_dims(dims)) {
        set_error(err, "trt_shim_context_set_input_shape: null argument or bad dims");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting an input shape", [&]() {
        c->logger->begin();
        const bool ok = c->context->setInputShape(name, to_trt(*dims));
        if (c->logger->failed((std::string("setInputShape('") + name + "')").c_str(), err)) {
            return TRT_SHIM_FAILED;
        }
        if (!ok) {
            set_error(err, std::string("TensorRT rejected the shape of input '") + name +
                               "' (outside the engine's optimisation profile?)");
            return TRT_SHIM_FAILED;
        }
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_context_tensor_shape(const TrtShimContext* c, const char* name, TrtShimDims* dims,
                                      TrtShimError* err) {
    if (c == nullptr || name == nullptr || dims == nullptr) {
        set_error(err, "trt_shim_context_tensor_shape: null argument");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "querying a tensor shape", [&]() {
        c->logger->begin();
        from_trt(c->context->getTensorShape(name), dims);
        if (c->logger->failed((std::string("getTensorShape('") + name + "')").c_str(), err)) {
            return TRT_SHIM_FAILED;
        }
        for (int32_t i = 0; i < dims->nb_dims; ++i) {
            if (dims->d[i] < 0) {
                set_error(err, std::string("the shape of '") + name + "' is not known (input shapes missing?)");
                return TRT_SHIM_FAILED;
            }
        }
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_context_set_tensor_address(TrtShimContext* c, const char* name, void* address, TrtShimError* err) {
    if (c == nullptr || name == nullptr || address == nullptr) {
        set_error(err, "trt_shim_context_set_tensor_address: null argument");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "setting a tensor address", [&]() {
        c->logger->begin();
        const bool ok = c->context->setTensorAddress(name, address);
        if (c->logger->failed((std::string("setTensorAddress('") + name + "')").c_str(), err)) {
            return TRT_SHIM_FAILED;
        }
        if (!ok) {
            set_error(err, std::string("TensorRT rejected the address of '") + name + "' (misaligned or unknown)");
            return TRT_SHIM_FAILED;
        }
        return TRT_SHIM_OK;
    });
}

int32_t trt_shim_context_enqueue(TrtShimContext* c, void* stream, TrtShimError* err) {
    if (c == nullptr) {
        set_error(err, "trt_shim_context_enqueue: null context");
        return TRT_SHIM_FAILED;
    }
    return guarded(err, "running the engine", [&]() {
        c->logger->begin();
        const bool ok = c->context->enqueueV3(static_cast<cudaStream_t>(stream));
        if (c->logger->failed("enqueueV3", err)) {
            return TRT_SHIM_FAILED;
        }
        if (!ok) {
            set_error(err, "enqueueV3 failed (input shapes or tensor addresses missing?)");
            return TRT_SHIM_FAILED;
        }
        return TRT_SHIM_OK;
    });
}

// ---- test hooks ----

void* trt_shim_test_factory_null(void* /*logger*/, int32_t /*version*/) { return nullptr; }

void* trt_shim_test_factory_logs_error(void* logger, int32_t /*version*/) {
    static int bogus = 0;
    if (logger != nullptr) {
        static_cast<ILogger*>(logger)->log(Severity::kERROR,
                                           "simulated: CUDA initialization failure with error: 35");
    }
    return &bogus;
}

void* trt_shim_test_factory_null_parser(void* /*network*/, void* /*logger*/, int32_t /*version*/) { return nullptr; }

}  // extern "C"
