/*
 * PEG (positional encoding generator) kernel of the MobileVLM V2 projector:
 *
 *     y = x + bias + depthwise_conv3x3(x, weight)      stride 1, zero padding 1
 *
 * x, y: [N, C, H, W] linear (NCHW, contiguous); weight: [C, 1, 3, 3]; bias: [C].
 * All four tensors have the same dtype: FP32, or FP16 with FP32 accumulation.
 *
 * This is a plain C header so that the kernel library (libmvlm_peg_kernel.so) can be
 * called through ctypes without TensorRT; the TensorRT plugin calls the same function.
 */
#ifndef MVLM_PEG_KERNEL_H
#define MVLM_PEG_KERNEL_H

#if defined(__GNUC__)
#define MVLM_PEG_API __attribute__((visibility("default")))
#else
#define MVLM_PEG_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Values of the dtype argument. */
enum MvlmPegDtype
{
    MVLM_PEG_FLOAT32 = 0,
    MVLM_PEG_FLOAT16 = 1
};

/*
 * Enqueues y = x + bias + dw3x3(x) on `stream` (a cudaStream_t; NULL is the legacy default
 * stream). Returns a cudaError_t value: 0 (cudaSuccess) when the launch was accepted,
 * cudaErrorInvalidValue (1) for a negative dimension, an unknown dtype, a null pointer with
 * a non-empty tensor or y overlapping x (the kernel reads neighbours of x while writing y,
 * so it cannot run in place), else the error reported by the launch. An empty tensor
 * (any dimension 0) is a no-op.
 */
MVLM_PEG_API int mvlmPegForward(const void* x, const void* weight, const void* bias, void* y, int n, int c,
    int height, int width, int dtype, void* stream);

/* cudaGetErrorString for the codes returned above (works without a GPU). */
MVLM_PEG_API const char* mvlmPegErrorString(int code);

#ifdef __cplusplus
}
#endif

#endif /* MVLM_PEG_KERNEL_H */
