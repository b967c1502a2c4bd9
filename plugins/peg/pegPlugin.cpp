#include "pegPlugin.h"

#include "pegKernel.h"

#include <atomic>
#include <climits>
#include <exception>
#include <string>

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::ILoggerFinder;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace mvlm_compile
{
namespace
{

constexpr int32_t kNbInputs = 3;
constexpr int32_t kNbOutputs = 1;
constexpr int32_t kX = 0;
constexpr int32_t kWeight = 1;
constexpr int32_t kBias = 2;

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void logError(char const* message) noexcept
{
    ILoggerFinder* const finder = gLoggerFinder.load();
    ILogger* const logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger == nullptr)
    {
        return;
    }
    try
    {
        logger->log(ILogger::Severity::kERROR, (std::string{MVLM_PEG_PLUGIN_NAME ": "} + message).c_str());
    }
    catch (std::exception const&)
    {
        // Out of memory while formatting: the caller's error code still reaches TensorRT.
    }
}

// True when the ranks are right and every pair of dimensions that must be equal is equal.
// At build time a dimension may be -1 (dynamic); such a dimension agrees with anything here,
// and onShapeChange() repeats the check on the concrete shapes.
bool shapesAgree(Dims const& x, Dims const& weight, Dims const& bias, Dims const& y) noexcept
{
    if (x.nbDims != 4 || weight.nbDims != 4 || bias.nbDims != 1 || y.nbDims != 4)
    {
        return false;
    }
    auto const agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
    bool ok = agree(weight.d[0], x.d[1]) && agree(weight.d[1], 1) && agree(weight.d[2], 3) && agree(weight.d[3], 3)
        && agree(bias.d[0], x.d[1]);
    for (int32_t i = 0; i < 4; ++i)
    {
        ok = ok && agree(x.d[i], y.d[i]);
    }
    return ok;
}

} // namespace

void setPegLoggerFinder(ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

IPluginCapability* PegPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* PegPlugin::clone() noexcept
{
    // The op has no attributes and the plugin keeps no per-shape state (enqueue reads the
    // shapes from its descriptors), so a clone is a fresh object.
    try
    {
        return new PegPlugin{};
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

char const* PegPlugin::getPluginName() const noexcept
{
    return MVLM_PEG_PLUGIN_NAME;
}

char const* PegPlugin::getPluginVersion() const noexcept
{
    return MVLM_PEG_PLUGIN_VERSION;
}

char const* PegPlugin::getPluginNamespace() const noexcept
{
    return MVLM_PEG_PLUGIN_NAMESPACE;
}

int32_t PegPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t PegPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 3 inputs (x, weight, bias) and 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t PegPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbShapeInputs != 0 || nbOutputs != kNbOutputs || inputs[kX].nbDims != 4)
    {
        logError("expects inputs x [N,C,H,W], weight [C,1,3,3], bias [C] and 1 output");
        return -1;
    }
    outputs[0] = inputs[kX];
    return 0;
}

bool PegPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == kX)
    {
        return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    }
    // weight, bias and y follow x, so one kernel instantiation serves each combination.
    return desc.type == inOut[kX].desc.type;
}

int32_t PegPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs
        || !shapesAgree(in[kX].desc.dims, in[kWeight].desc.dims, in[kBias].desc.dims, out[0].desc.dims))
    {
        logError("expects x [N,C,H,W], weight [C,1,3,3], bias [C] and y of the shape of x");
        return -1;
    }
    return 0;
}

int32_t PegPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs
        || !shapesAgree(in[kX].dims, in[kWeight].dims, in[kBias].dims, out[0].dims))
    {
        logError("expects x [N,C,H,W], weight [C,1,3,3], bias [C] and y of the shape of x");
        return -1;
    }
    for (int32_t i = 0; i < 4; ++i)
    {
        if (in[kX].dims.d[i] > INT_MAX)
        {
            logError("a dimension of x exceeds INT_MAX");
            return -1;
        }
    }
    return 0;
}

int32_t PegPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    Dims const& d = inputDesc[kX].dims; // each fits in int: checked by onShapeChange()
    int const dtype = inputDesc[kX].type == DataType::kHALF ? MVLM_PEG_FLOAT16 : MVLM_PEG_FLOAT32;
    int const status = mvlmPegForward(inputs[kX], inputs[kWeight], inputs[kBias], outputs[0],
        static_cast<int>(d.d[0]), static_cast<int>(d.d[1]), static_cast<int>(d.d[2]), static_cast<int>(d.d[3]),
        dtype, stream);
    if (status != 0)
    {
        logError(mvlmPegErrorString(status));
    }
    return status;
}

IPluginV3* PegPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources (no workspace, no handles): the attached copy is a clone.
    return clone();
}

PluginFieldCollection const* PegPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldsToSerialize;
}

char const* PegPluginCreator::getPluginName() const noexcept
{
    return MVLM_PEG_PLUGIN_NAME;
}

char const* PegPluginCreator::getPluginVersion() const noexcept
{
    return MVLM_PEG_PLUGIN_VERSION;
}

char const* PegPluginCreator::getPluginNamespace() const noexcept
{
    return MVLM_PEG_PLUGIN_NAMESPACE;
}

PluginFieldCollection const* PegPluginCreator::getFieldNames() noexcept
{
    return &mFieldNames;
}

IPluginV3* PegPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    // The contract has no attributes. At build time the ONNX parser passes only the fields
    // named by getFieldNames() (none); at runtime TensorRT passes back getFieldsToSerialize()
    // (none). A field here means the graph was made for another version of the op.
    if (fc != nullptr && fc->nbFields != 0)
    {
        logError("takes no attributes (see plugins/peg/peg_contract.json)");
        return nullptr;
    }
    try
    {
        return new PegPlugin{};
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace mvlm_compile
