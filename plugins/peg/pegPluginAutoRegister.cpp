/*
 * Load-time registration for libmvlm_peg_plugin_autoreg.so: loading the library (ctypes.CDLL
 * in Python, dlopen or linking in C++) registers the PEG creator with TensorRT's global
 * plugin registry, as the TensorRT Python samples do with REGISTER_TENSORRT_PLUGIN.
 *
 * It does what REGISTER_TENSORRT_PLUGIN does, with one difference: the macro registers under
 * the namespace "", while the creator (and every plugin it makes) reports the contract's
 * namespace; registering under that same namespace keeps the lookup that the ONNX parser
 * makes with the node's plugin_namespace attribute, and the one the runtime makes when it
 * deserializes an engine, unambiguous.
 *
 * Never pass this library to loadLibrary()/--dynamicPlugins: use libmvlm_peg_plugin.so, which
 * exports getCreators() instead (see pegPluginExports.cpp for why one library cannot do both).
 */
#include "pegPlugin.h"

namespace
{

class PegAutoRegistrar
{
public:
    PegAutoRegistrar()
    {
        getPluginRegistry()->registerCreator(mCreator, MVLM_PEG_PLUGIN_NAMESPACE);
    }

private:
    mvlm_compile::PegPluginCreator mCreator;
};

PegAutoRegistrar const gRegistrar{};

} // namespace
