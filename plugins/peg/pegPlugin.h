/*
 * TensorRT plugin (IPluginV3) for the MobileVLM V2 PEG op:
 *     y = x + bias + depthwise_conv3x3(x, weight), stride 1, zero padding 1.
 * Inputs x [N,C,H,W], weight [C,1,3,3], bias [C]; output y [N,C,H,W]; FP32 or FP16, all four
 * of the same type, LINEAR (NCHW) format; every dimension of x may be dynamic.
 *
 * The name, version and namespace come from plugins/peg/peg_contract.json through compile
 * definitions set by CMake (MVLM_PEG_PLUGIN_NAME / _VERSION / _NAMESPACE).
 * Written against the TensorRT 10.3 headers (JetPack 6.1/6.2) and using nothing newer.
 */
#ifndef MVLM_PEG_PLUGIN_H
#define MVLM_PEG_PLUGIN_H

#include "NvInferRuntime.h"
#include "NvInferVersion.h"

static_assert(NV_TENSORRT_MAJOR >= 10, "the PEG plugin implements IPluginV3, which needs TensorRT 10 or newer");

#if !defined(MVLM_PEG_PLUGIN_NAME) || !defined(MVLM_PEG_PLUGIN_VERSION) || !defined(MVLM_PEG_PLUGIN_NAMESPACE)
#error "MVLM_PEG_PLUGIN_NAME/_VERSION/_NAMESPACE must be defined from peg_contract.json (see CMakeLists.txt)"
#endif

namespace mvlm_compile
{

class PegPlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuild,
                  public nvinfer1::IPluginV3OneRuntime
{
public:
    PegPlugin() = default;
    PegPlugin(PegPlugin const&) = delete;
    PegPlugin& operator=(PegPlugin const&) = delete;
    ~PegPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // The op has no attributes, so the serialized collection is empty; it is a member because
    // TensorRT reads it after getFieldsToSerialize() has returned.
    nvinfer1::PluginFieldCollection mFieldsToSerialize{0, nullptr};
};

class PegPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    PegPluginCreator() = default;
    ~PegPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    nvinfer1::PluginFieldCollection mFieldNames{0, nullptr};
};

// Where logError() finds TensorRT's logger: TensorRT hands a finder to a library it loads
// itself (setLoggerFinder, exported by pegPluginExports.cpp); without one, errors are only
// reported through the return codes.
void setPegLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

} // namespace mvlm_compile

#endif // MVLM_PEG_PLUGIN_H
