"""PEG op: CUDA kernel, TensorRT plugin sources, and their Python side (mvlm_compile.peg_op, mvlm_compile.trt_env).

What runs where:
  - everywhere: the contract and library lookup; the kernel compiled for Orin (sm_87) and
    Hopper (sm_90) and its argument checks through ctypes (they return before touching a GPU);
  - with TensorRT headers (TENSORRT_ROOT or the system paths): the plugin compiled with
    -Wall -Wextra -Werror and linked with the kernel into libmvlm_peg_plugin.so;
  - with the `tensorrt` or TensorRT-RTX Python module: that library registered through load_library;
  - with a CUDA GPU and torch CUDA: the kernel against torch's conv2d.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from mvlm_compile import peg_op as plugin
from mvlm_compile.peg_op import PEG_CONTRACT, PluginLibraryError
from mvlm_compile.trt_env import TENSORRT, TENSORRT_RTX, import_flavour, load_plugin_library

PEG_DIR = plugin.PEG_DIR
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = shutil.which("nvcc") or next((str(p) for p in [CUDA_HOME / "bin" / "nvcc"] if p.is_file()), None)
CUDA_INVALID_VALUE = 1  # cudaErrorInvalidValue
CUDA_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver

# Orin is sm_87; Hopper (H100/H200, where the benchmark runs) is sm_90.
KERNEL_ARCHS = (87, 90)
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler=-fPIC,-fvisibility=hidden"]
CXX_FLAGS = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def _tensorrt_header_dirs() -> list[Path]:
    """Where CMakeLists.txt looks for NvInferRuntime.h, in the same order."""
    dirs = []
    root = os.environ.get("TENSORRT_ROOT")
    if root:
        dirs += [Path(root) / "include", Path(root)]
    return dirs + [
        Path("/usr/include/aarch64-linux-gnu"),
        Path("/usr/include/x86_64-linux-gnu"),
        Path("/usr/include"),
    ]


def _cuda_elf_archs(obj: Path) -> list[int]:
    """SM versions of the cubins embedded in an object's .nv_fatbin section.

    Each cubin is an ELF image with e_machine EM_CUDA (190); its e_flags hold the SM version, in
    bits 8-15 from ELF ABI version 8 on (CUDA 13's nvcc writes that) and in bits 0-7 before.
    """
    section = obj.with_suffix(".fatbin")
    _run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(obj), str(section)])
    data = section.read_bytes()
    archs = []
    start = data.find(b"\x7fELF")
    while start >= 0:
        (machine,) = struct.unpack_from("<H", data, start + 18)
        (flags,) = struct.unpack_from("<I", data, start + 48)
        if machine == 190:
            archs.append((flags >> 8) & 0xFF if data[start + 8] >= 8 else flags & 0xFF)
        start = data.find(b"\x7fELF", start + 4)
    return sorted(archs)


@pytest.fixture(scope="module")
def kernel_build(tmp_path_factory) -> Path:
    """pegKernel.cu compiled once for sm_87 and sm_90 (pegKernel.o), linked into libmvlm_peg_kernel.so."""
    if NVCC is None:
        pytest.skip(f"nvcc not found (PATH, {CUDA_HOME / 'bin'})")
    out = tmp_path_factory.mktemp("peg_kernel")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in KERNEL_ARCHS]
    source, obj = str(PEG_DIR / "pegKernel.cu"), str(out / "pegKernel.o")
    _run([NVCC, *NVCC_FLAGS, *gencode, "-c", source, "-o", obj])
    _run([NVCC, "-shared", "-o", str(out / plugin.KERNEL_LIBRARY), str(out / "pegKernel.o")])
    return out


@pytest.fixture(scope="module")
def plugin_build(kernel_build, tmp_path_factory) -> Path:
    """libmvlm_peg_plugin.so built from pegPlugin.cpp + pegPluginExports.cpp + the kernel object,
    against the first TensorRT headers found; pegPluginAutoRegister.cpp is compiled only (linking
    it needs libnvinfer)."""
    header_dirs = _tensorrt_header_dirs()
    include = next((d for d in header_dirs if (d / "NvInferRuntime.h").is_file()), None)
    if include is None:
        pytest.skip(f"TensorRT headers not found (looked in {', '.join(str(d) for d in header_dirs)})")
    out = tmp_path_factory.mktemp("peg_plugin")
    identity = [
        f'-DMVLM_PEG_PLUGIN_NAME="{PEG_CONTRACT["op_type"]}"',
        f'-DMVLM_PEG_PLUGIN_VERSION="{PEG_CONTRACT["plugin_version"]}"',
        f'-DMVLM_PEG_PLUGIN_NAMESPACE="{PEG_CONTRACT["plugin_namespace"]}"',
    ]
    flags = [*CXX_FLAGS, "-isystem", str(include), "-isystem", str(CUDA_HOME / "include"), *identity]
    objects = []
    for source in ("pegPlugin.cpp", "pegPluginExports.cpp", "pegPluginAutoRegister.cpp"):
        objects.append(str(out / Path(source).with_suffix(".o").name))
        _run(["g++", *flags, "-c", str(PEG_DIR / source), "-o", objects[-1]])
    # Everything but the autoreg object, which needs libnvinfer's getPluginRegistry().
    linked = [*objects[:2], str(kernel_build / "pegKernel.o")]
    cudart = [f"-L{CUDA_HOME / 'lib64'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    _run(["g++", "-shared", "-Wl,--no-undefined", "-o", str(out / plugin.PLUGIN_LIBRARY), *linked, *cudart])
    return out


def test_contract_has_the_fields_the_pass_needs():
    assert PEG_CONTRACT["op_type"] == "MvlmPEG"
    assert PEG_CONTRACT["plugin_version"] == "1"
    assert PEG_CONTRACT["plugin_namespace"] == "mvlm_compile"
    assert isinstance(PEG_CONTRACT["onnx_domain"], str) and PEG_CONTRACT["onnx_domain"]
    assert [i["name"] for i in PEG_CONTRACT["inputs"]] == ["x", "weight", "bias"]
    assert [i["shape"] for i in PEG_CONTRACT["inputs"]] == [["N", "C", "H", "W"], ["C", 1, 3, 3], ["C"]]
    assert [o["name"] for o in PEG_CONTRACT["outputs"]] == ["y"]
    # The plugin's getFieldNames() is empty and its creator rejects any field.
    assert PEG_CONTRACT["attributes"] == {}


def test_load_contract_names_a_missing_field(tmp_path):
    broken = tmp_path / "peg_contract.json"
    broken.write_text('{"op_type": "MvlmPEG", "inputs": [], "outputs": []}')
    with pytest.raises(PluginLibraryError, match="lacks plugin_version, plugin_namespace, onnx_domain"):
        plugin.load_contract(broken)


def test_find_plugin_library_names_where_it_looked_and_how_to_name_one(tmp_path, monkeypatch):
    monkeypatch.delenv(plugin.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(plugin, "BUILD_DIRS", (tmp_path / "build",))
    with pytest.raises(PluginLibraryError) as err:
        plugin.find_plugin_library()
    message = str(err.value)
    assert "MVLM_PEG_PLUGIN is unset" in message
    assert str(tmp_path / "build" / "libmvlm_peg_plugin.so") in message
    assert "cmake -S plugins/peg -B plugins/peg/build" in message and "--plugin PATH" in message


def test_the_plugin_library_is_only_one_the_user_chose_or_this_installation_built(tmp_path, monkeypatch):
    """--plugin, else $MVLM_PEG_PLUGIN, else this installation's plugins/peg/build; a wrong explicit
    choice is an error, never a fall back to another library or to none."""
    build, option, env = tmp_path / "build", tmp_path / "option.so", tmp_path / "env.so"
    monkeypatch.setattr(plugin, "BUILD_DIRS", (build,))
    monkeypatch.delenv(plugin.PLUGIN_ENV, raising=False)
    assert plugin.chosen_plugin_library() is None

    build.mkdir()
    (build / plugin.PLUGIN_LIBRARY).write_bytes(b"")
    assert plugin.find_plugin_library() == build / plugin.PLUGIN_LIBRARY

    env.write_bytes(b"")
    monkeypatch.setenv(plugin.PLUGIN_ENV, str(env))
    assert plugin.find_plugin_library() == env

    option.write_bytes(b"")
    assert plugin.find_plugin_library(option) == option == plugin.chosen_plugin_library(option)

    with pytest.raises(PluginLibraryError, match="--plugin .*missing.so: not a file"):
        plugin.chosen_plugin_library(tmp_path / "missing.so")
    monkeypatch.setenv(plugin.PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(PluginLibraryError, match="MVLM_PEG_PLUGIN=.*missing.so is not a file"):
        plugin.chosen_plugin_library()


def test_cmake_takes_nvcc_from_usr_local_cuda_when_it_is_not_on_path(tmp_path):
    """As on JetPack, where /usr/local/cuda/bin is not on PATH: configuring must still find nvcc."""
    jetpack_nvcc = Path("/usr/local/cuda/bin/nvcc")
    cmake = shutil.which("cmake")
    if cmake is None or not jetpack_nvcc.is_file():
        pytest.skip(f"needs cmake and {jetpack_nvcc}")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(d for d in ("/usr/bin", "/bin") if not (Path(d) / "nvcc").exists())
    done = subprocess.run([cmake, "-S", str(PEG_DIR), "-B", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"CMAKE_CUDA_COMPILER:STRING={jetpack_nvcc}" in (tmp_path / "CMakeCache.txt").read_text()


def test_kernel_compiles_for_orin_and_hopper(kernel_build):
    assert _cuda_elf_archs(kernel_build / "pegKernel.o") == list(KERNEL_ARCHS)
    lib = plugin.load_kernel_library(kernel_build / plugin.KERNEL_LIBRARY)
    assert lib.mvlmPegErrorString(0) == b"no error"


def test_kernel_entry_point_checks_arguments_before_touching_the_gpu(kernel_build):
    lib = plugin.load_kernel_library(kernel_build / plugin.KERNEL_LIBRARY)
    fake_a, fake_b = 0x10000, 0x80000  # never dereferenced: every call below returns before a launch
    # An empty tensor is a no-op, even with null pointers.
    plugin.peg_forward_gpu(lib, 0, 0, 0, 0, (0, 2048, 12, 12), "float16")
    plugin.peg_forward_gpu(lib, 0, 0, 0, 0, (1, 2048, 0, 12), "float32")
    with pytest.raises(RuntimeError, match="CUDA error 1 "):
        plugin.peg_forward_gpu(lib, fake_a, fake_a, fake_a, fake_b, (1, -1, 12, 12), "float32")
    # Null pointer with a non-empty tensor.
    assert lib.mvlmPegForward(fake_a, fake_a, None, fake_b, 1, 4, 12, 12, 0, None) == CUDA_INVALID_VALUE
    # Unknown dtype.
    assert lib.mvlmPegForward(fake_a, fake_a, fake_a, fake_b, 1, 4, 12, 12, 7, None) == CUDA_INVALID_VALUE
    # y overlapping x (1*4*12*12 fp32 = 2304 bytes): in place is not supported.
    assert lib.mvlmPegForward(fake_a, fake_a, fake_a, fake_a + 2300, 1, 4, 12, 12, 0, None) == CUDA_INVALID_VALUE
    with pytest.raises(ValueError, match="dtype must be one of"):
        plugin.peg_forward_gpu(lib, fake_a, fake_a, fake_a, fake_b, (1, 4, 12, 12), "bfloat16")


def test_plugin_compiles_against_tensorrt_headers(plugin_build):
    lib = ctypes.CDLL(str(plugin_build / plugin.PLUGIN_LIBRARY))  # links no TensorRT library
    lib.getCreators.restype = ctypes.c_void_p
    count = ctypes.c_int32(-1)
    assert lib.getCreators(ctypes.byref(count))  # a non-null creator list...
    assert count.value == 1  # ...of one creator
    assert hasattr(lib, "setLoggerFinder")


@pytest.mark.parametrize("flavour", [TENSORRT, TENSORRT_RTX], ids=lambda f: f.name)
def test_plugin_registers_with_tensorrt(plugin_build, flavour):
    trt, why = import_flavour(flavour)
    if trt is None:
        pytest.skip(why)
    creator = load_plugin_library(plugin_build / plugin.PLUGIN_LIBRARY, trt)
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (
        PEG_CONTRACT["op_type"],
        PEG_CONTRACT["plugin_version"],
        PEG_CONTRACT["plugin_namespace"],
    )
    # A second call finds the registered creator instead of loading the library again.
    assert load_plugin_library(plugin_build / plugin.PLUGIN_LIBRARY, trt) is not None
    # What the ONNX parser does at build time: no fields, since getFieldNames() is empty.
    assert creator.create_plugin("peg", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD) is not None


# --- On a CUDA GPU: the kernel against torch's depthwise conv2d.


@pytest.fixture(scope="module")
def gpu_kernel(tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    if NVCC is None:
        pytest.skip(f"nvcc not found (PATH, {CUDA_HOME / 'bin'})")
    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("peg_kernel_gpu")
    lib_path = out / plugin.KERNEL_LIBRARY
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    _run([NVCC, *NVCC_FLAGS, "-shared", arch, str(PEG_DIR / "pegKernel.cu"), "-o", str(lib_path)])
    lib = plugin.load_kernel_library(lib_path)
    # The library carries nvcc's CUDA runtime (static): a driver older than it cannot run it.
    x = torch.zeros(9, device="cuda")  # doubles as the 3x3 weight and the bias of a 1x1x1x1 problem
    y = torch.zeros(1, device="cuda")
    status = lib.mvlmPegForward(x.data_ptr(), x.data_ptr(), x.data_ptr(), y.data_ptr(), 1, 1, 1, 1, 0, None)
    torch.cuda.synchronize()
    if status == CUDA_INSUFFICIENT_DRIVER:
        pytest.skip(f"the CUDA driver is older than the runtime of {NVCC}")
    assert status == 0, lib.mvlmPegErrorString(status)
    return lib


SHAPES = [
    (1, 2048, 12, 12),  # MobileVLM V2 1.7B projector
    (8, 2048, 12, 12),
    (2, 2560, 12, 12),  # 3B
    (4, 4096, 12, 12),  # 7B
    (3, 7, 5, 9),
    (1, 4, 1, 1),
    (2, 3, 1, 6),
    (2, 3, 6, 1),
    (1, 5, 40, 33),  # plane of 1320 elements: several blocks per plane
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_torch_conv2d(gpu_kernel, shape, dtype):
    import torch
    import torch.nn.functional as F

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(n * 100003 + c * 101 + h * 11 + w)
    torch_dtype = getattr(torch, dtype)
    # Inputs rounded to the I/O dtype first: the reference sees exactly what the kernel sees.
    x = torch.randn(shape, generator=gen).to(torch_dtype)
    weight = (0.3 * torch.randn(c, 1, 3, 3, generator=gen)).to(torch_dtype)
    bias = torch.randn(c, generator=gen).to(torch_dtype)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1, groups=c) + x.double()

    # y sits between two guard bands filled with a sentinel: the kernel must write every element
    # of y (NaN elsewhere would fail the comparison) and nothing outside it.
    guard, numel = 1024, n * c * h * w
    buffer = torch.full((numel + 2 * guard,), float("nan"), dtype=torch_dtype, device="cuda")
    buffer[:guard] = 7.0
    buffer[-guard:] = 7.0
    y = buffer[guard : guard + numel].view(shape)
    x_gpu, weight_gpu, bias_gpu = x.cuda(), weight.cuda(), bias.cuda()
    plugin.peg_forward_gpu(
        gpu_kernel,
        x_gpu.data_ptr(),
        weight_gpu.data_ptr(),
        bias_gpu.data_ptr(),
        y.data_ptr(),
        shape,
        dtype,
        torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()

    assert torch.all(buffer[:guard] == 7.0) and torch.all(buffer[-guard:] == 7.0)
    result = y.double().cpu()
    error = (result - reference).abs()
    scale = reference.abs().max().item()
    # FP32: 11 terms summed in FP32 in another order than the FP64 reference; 1e-5 of the
    # output's scale is ~100x the worst such rounding.
    allowed = torch.full_like(reference, 1e-5 * scale)
    if dtype == "float16":
        # FP16 output: accumulating in FP32 and rounding once leaves at most half an FP16 ulp
        # (2^-11 relative; 2^-25 absolute in the subnormal range); allow one ulp.
        allowed += reference.abs() * 2.0**-10 + 2.0**-24
    worst = (error - allowed).max().item()
    assert worst <= 0, f"max error {error.max().item():.3g} exceeds the tolerance (scale {scale:.3g})"
