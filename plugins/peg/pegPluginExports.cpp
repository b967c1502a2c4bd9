/*
 * Entry points of libmvlm_peg_plugin.so for TensorRT's own library loader:
 * IPluginRegistry::loadLibrary() (Python: trt.get_plugin_registry().load_library(path)),
 * trtexec --dynamicPlugins / --setPluginsToSerialize, and plugin libraries serialized into
 * version-compatible engines. The loader registers every creator returned by getCreators().
 *
 * This library deliberately has no load-time registration (REGISTER_TENSORRT_PLUGIN): the
 * loader dlopen()s the library before calling getCreators(), so a creator registered by a
 * static initializer would already be present and loadLibrary() fails on a creator that is
 * already registered. It also does not link libnvinfer, which lets the lean and dispatch
 * runtimes load it. Load-time registration for ctypes.CDLL lives in a separate library,
 * libmvlm_peg_plugin_autoreg.so (pegPluginAutoRegister.cpp).
 */
#include "pegKernel.h"
#include "pegPlugin.h"

extern "C" MVLM_PEG_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static mvlm_compile::PegPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" MVLM_PEG_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    mvlm_compile::setPegLoggerFinder(finder);
}
