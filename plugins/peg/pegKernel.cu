/*
 * y = x + bias + depthwise_conv3x3(x, weight), stride 1, zero padding 1, NCHW linear.
 *
 * Design (why this and not a shared-memory tile):
 * In MobileVLM V2 the PEG runs on 12x12 planes: a plane is 576 B in FP32 and 288 B in FP16,
 * a handful of cache lines. Each thread computes one output element and reads its (up to) 9
 * neighbours straight from global memory through the read-only data cache: the first touch
 * of a line brings it from DRAM/L2 and the other 8 reads of that line (by the same or
 * neighbouring threads of the block) hit L1, so DRAM traffic is one read of x and one write
 * of y, which is the minimum for this op. A shared-memory tile + halo would need a separate
 * tiled path for planes too large for shared memory and a __syncthreads per tile, for no
 * saving in DRAM traffic at this size; the cache-based form is the same code for every
 * N, C, H, W (H or W = 1 included: the bounds checks drop the missing neighbours, which is
 * exactly zero padding).
 *
 * Work split: blockIdx.x walks planes (n, c), so the channel index, its 9 weights and its
 * bias are computed/loaded once per block (uniform addresses, broadcast loads) instead of
 * once per element; blockIdx.y and threadIdx.x walk the elements of the plane. For 12x12 a
 * block is 160 threads (144 busy) and N*C blocks fill the GPU (2048..32768 blocks at batch
 * 1..8). Both loops are grid-stride loops, so any plane count or plane size is covered
 * whatever the grid limits.
 *
 * Precision: FP16 inputs are widened to FP32, everything is accumulated in FP32 and the
 * result is rounded to FP16 once, on store.
 */
#include "pegKernel.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace
{

constexpr int64_t kMaxThreads = 256;
constexpr int64_t kMaxGridY = 65535; // CUDA limit on gridDim.y

__device__ __forceinline__ float loadAsFloat(float const* p)
{
    return __ldg(p);
}

__device__ __forceinline__ float loadAsFloat(__half const* p)
{
    return __half2float(__ldg(p));
}

__device__ __forceinline__ void storeFromFloat(float* p, float v)
{
    *p = v;
}

__device__ __forceinline__ void storeFromFloat(__half* p, float v)
{
    *p = __float2half_rn(v);
}

// Index is the type of an element index inside one plane: int32_t whenever H*W (plus one
// grid stride, so that the loop counter cannot overflow) fits in it, because the per-element
// row/column split (a division by W) is several times cheaper in 32 bits than in 64;
// int64_t only for planes of about 2^31 elements or more.
template <typename T, typename Index>
__global__ void pegKernel(T const* __restrict__ x, T const* __restrict__ weight, T const* __restrict__ bias,
    T* __restrict__ y, int64_t planes, int channels, Index height, Index width)
{
    Index const planeSize = height * width;
    for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x)
    {
        int const c = static_cast<int>(plane % channels);
        float k[9];
#pragma unroll
        for (int t = 0; t < 9; ++t)
        {
            k[t] = loadAsFloat(weight + static_cast<int64_t>(c) * 9 + t);
        }
        float const b = loadAsFloat(bias + c);

        T const* xp = x + plane * static_cast<int64_t>(planeSize);
        T* yp = y + plane * static_cast<int64_t>(planeSize);
        Index const stride = static_cast<Index>(gridDim.y) * static_cast<Index>(blockDim.x);
        for (Index i = static_cast<Index>(blockIdx.y) * static_cast<Index>(blockDim.x)
                 + static_cast<Index>(threadIdx.x);
             i < planeSize; i += stride)
        {
            Index const h = i / width;
            Index const w = i - h * width;
            float acc = loadAsFloat(xp + i) + b;
#pragma unroll
            for (int dh = -1; dh <= 1; ++dh)
            {
                Index const hh = h + dh;
                if (hh < 0 || hh >= height)
                {
                    continue;
                }
#pragma unroll
                for (int dw = -1; dw <= 1; ++dw)
                {
                    Index const ww = w + dw;
                    if (ww < 0 || ww >= width)
                    {
                        continue;
                    }
                    acc += k[(dh + 1) * 3 + (dw + 1)] * loadAsFloat(xp + hh * width + ww);
                }
            }
            storeFromFloat(yp + i, acc);
        }
    }
}

template <typename T, typename Index>
cudaError_t launch(void const* x, void const* weight, void const* bias, void* y, int64_t planes, int channels,
    int64_t height, int64_t width, cudaStream_t stream)
{
    int64_t const planeSize = height * width;
    // One warp-multiple block per plane chunk, at most 256 threads: a 12x12 plane gets 160.
    int64_t const threads = std::min<int64_t>(kMaxThreads, (planeSize + 31) / 32 * 32);
    dim3 const grid(static_cast<unsigned>(std::min<int64_t>(planes, INT_MAX)),
        static_cast<unsigned>(std::min<int64_t>((planeSize + threads - 1) / threads, kMaxGridY)));
    pegKernel<T, Index><<<grid, static_cast<unsigned>(threads), 0, stream>>>(static_cast<T const*>(x),
        static_cast<T const*>(weight), static_cast<T const*>(bias), static_cast<T*>(y), planes, channels,
        static_cast<Index>(height), static_cast<Index>(width));
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatchIndex(void const* x, void const* weight, void const* bias, void* y, int64_t planes,
    int channels, int64_t height, int64_t width, cudaStream_t stream)
{
    if (height * width <= INT_MAX - kMaxGridY * kMaxThreads)
    {
        return launch<T, int32_t>(x, weight, bias, y, planes, channels, height, width, stream);
    }
    return launch<T, int64_t>(x, weight, bias, y, planes, channels, height, width, stream);
}

} // namespace

extern "C" int mvlmPegForward(void const* x, void const* weight, void const* bias, void* y, int n, int c,
    int height, int width, int dtype, void* stream)
{
    if (n < 0 || c < 0 || height < 0 || width < 0 || (dtype != MVLM_PEG_FLOAT32 && dtype != MVLM_PEG_FLOAT16))
    {
        return cudaErrorInvalidValue;
    }
    int64_t const planes = static_cast<int64_t>(n) * c;
    int64_t const elements = planes * height * width;
    if (elements == 0)
    {
        return cudaSuccess;
    }
    if (x == nullptr || weight == nullptr || bias == nullptr || y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    uintptr_t const bytes = static_cast<uintptr_t>(elements) * (dtype == MVLM_PEG_FLOAT32 ? 4 : 2);
    uintptr_t const xBegin = reinterpret_cast<uintptr_t>(x);
    uintptr_t const yBegin = reinterpret_cast<uintptr_t>(y);
    if (xBegin < yBegin + bytes && yBegin < xBegin + bytes)
    {
        return cudaErrorInvalidValue;
    }

    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    cudaError_t const status = dtype == MVLM_PEG_FLOAT32
        ? dispatchIndex<float>(x, weight, bias, y, planes, c, height, width, s)
        : dispatchIndex<__half>(x, weight, bias, y, planes, c, height, width, s);
    return static_cast<int>(status);
}

extern "C" char const* mvlmPegErrorString(int code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
