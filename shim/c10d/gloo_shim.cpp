// gloo_shim.cpp: see gloo_shim.h.
#include "gloo_shim.h"

#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void write_error(VgError* err, const char* what) {
    if (err == nullptr) {
        return;
    }
    std::strncpy(err->message, what, VG_ERROR_LEN - 1);
    err->message[VG_ERROR_LEN - 1] = '\0';
}

template <typename F>
int guarded(VgError* err, F&& f) {
    try {
        f();
        return VG_OK;
    } catch (const std::exception& e) {
        write_error(err, e.what());
        return VG_FAILED;
    } catch (...) {
        write_error(err, "unknown C++ exception in gloo");
        return VG_FAILED;
    }
}

// gloo's rendezvous store on top of the caller's callbacks.
class CallbackStore : public gloo::rendezvous::Store {
  public:
    explicit CallbackStore(const VgStore& s) : s_(s) {}

    void set(const std::string& key, const std::vector<char>& data) override {
        VgError err{};
        if (s_.set(s_.ctx, key.c_str(), reinterpret_cast<const uint8_t*>(data.data()), data.size(), &err) != 0) {
            throw std::runtime_error("store set '" + key + "': " + err.message);
        }
    }

    std::vector<char> get(const std::string& key) override {
        VgError err{};
        const uint8_t* data = nullptr;
        size_t len = 0;
        if (s_.get(s_.ctx, key.c_str(), &data, &len, &err) != 0) {
            throw std::runtime_error("store get '" + key + "': " + err.message);
        }
        return std::vector<char>(reinterpret_cast<const char*>(data), reinterpret_cast<const char*>(data) + len);
    }

    void wait(const std::vector<std::string>& keys) override { wait(keys, kDefaultTimeout); }

    void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
        std::vector<const char*> ptrs;
        ptrs.reserve(keys.size());
        for (const auto& k : keys) {
            ptrs.push_back(k.c_str());
        }
        VgError err{};
        if (s_.wait(s_.ctx, ptrs.data(), ptrs.size(), timeout.count(), &err) != 0) {
            throw std::runtime_error(std::string("store wait: ") + err.message);
        }
    }

  private:
    VgStore s_;
};

}  // namespace

struct VgContext {
    std::shared_ptr<gloo::transport::Device> device;
    std::shared_ptr<gloo::rendezvous::Context> context;
    std::chrono::milliseconds timeout;
    uint32_t tag = 0;
};

extern "C" {

int vg_api_version(void) {
    return VG_API_VERSION;
}

VgContext* vg_connect(const VgStore* store, int rank, int size, const char* hostname, const char* iface,
                      int64_t timeout_ms, VgError* err) {
    VgContext* out = nullptr;
    guarded(err, [&] {
        auto ctx = std::make_unique<VgContext>();
        gloo::transport::tcp::attr attr;
        if (iface != nullptr && iface[0] != '\0') {
            attr.iface = iface;
        } else {
            attr.hostname = hostname;
        }
        ctx->device = gloo::transport::tcp::CreateDevice(attr);
        ctx->timeout = std::chrono::milliseconds(timeout_ms);
        ctx->context = std::make_shared<gloo::rendezvous::Context>(rank, size);
        ctx->context->setTimeout(ctx->timeout);
        CallbackStore cb(*store);
        ctx->context->connectFullMesh(cb, ctx->device);
        out = ctx.release();
    });
    return out;
}

void vg_destroy(VgContext* ctx) {
    try {
        delete ctx;
    } catch (...) {
    }
}

int vg_allreduce_sum(VgContext* ctx, void* data, size_t count, int dtype, VgError* err) {
    return guarded(err, [&] {
        gloo::AllreduceOptions opts(ctx->context);
        opts.setTag(ctx->tag++);
        opts.setTimeout(ctx->timeout);
        if (dtype == VG_FLOAT32) {
            opts.setOutput(static_cast<float*>(data), count);
            opts.setReduceFunction(
                static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
        } else if (dtype == VG_FLOAT64) {
            opts.setOutput(static_cast<double*>(data), count);
            opts.setReduceFunction(
                static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<double>));
        } else {
            throw std::invalid_argument("vg_allreduce_sum: unknown dtype " + std::to_string(dtype));
        }
        gloo::allreduce(opts);
    });
}

int vg_broadcast(VgContext* ctx, void* data, size_t bytes, int root, VgError* err) {
    return guarded(err, [&] {
        gloo::BroadcastOptions opts(ctx->context);
        opts.setTag(ctx->tag++);
        opts.setTimeout(ctx->timeout);
        opts.setRoot(root);
        opts.setOutput(static_cast<uint8_t*>(data), bytes);
        gloo::broadcast(opts);
    });
}

int vg_barrier(VgContext* ctx, VgError* err) {
    return guarded(err, [&] {
        gloo::BarrierOptions opts(ctx->context);
        opts.setTag(ctx->tag++);
        opts.setTimeout(ctx->timeout);
        gloo::barrier(opts);
    });
}

}  // extern "C"
