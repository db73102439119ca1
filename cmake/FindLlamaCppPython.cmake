# Locate the llama-cpp-python installation that ggsteer compiles against.
#
# The extension links to the ggml/llama shared libraries that llama-cpp-python ships
# (site-packages/llama_cpp/lib) and includes the headers it installs
# (site-packages/include). We ask the Python interpreter doing the build where that
# installation is, so the build works inside pip's isolated build environment (where
# llama-cpp-python is a build requirement, taken from pip's wheel cache) and outside it
# (pip install --no-build-isolation against an already-installed llama-cpp-python).
#
# Sets: LlamaCppPython_FOUND, LlamaCppPython_VERSION, LlamaCppPython_INCLUDE_DIR,
#       LlamaCppPython_LIB_DIR, LlamaCppPython_HAS_CUDA, LlamaCppPython_HEADER_HASH
# and the imported target LlamaCppPython::ggml_base.

execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
        "import importlib.metadata as m, pathlib, llama_cpp; p = pathlib.Path(llama_cpp.__file__).parent; print(m.version('llama_cpp_python')); print(p / 'lib'); print(p.parent / 'include')"
    OUTPUT_VARIABLE _lcp_out
    RESULT_VARIABLE _lcp_rc
    ERROR_VARIABLE _lcp_err
    OUTPUT_STRIP_TRAILING_WHITESPACE)

if(NOT _lcp_rc EQUAL 0)
    message(FATAL_ERROR
        "ggsteer: could not import llama_cpp with ${Python_EXECUTABLE}:\n${_lcp_err}\n"
        "Install llama-cpp-python first (it is a build requirement of ggsteer).")
endif()

string(REPLACE "\n" ";" _lcp_lines "${_lcp_out}")
list(GET _lcp_lines 0 LlamaCppPython_VERSION)
list(GET _lcp_lines 1 LlamaCppPython_LIB_DIR)
list(GET _lcp_lines 2 LlamaCppPython_INCLUDE_DIR)

find_library(LlamaCppPython_GGML_BASE NAMES ggml-base PATHS "${LlamaCppPython_LIB_DIR}" NO_DEFAULT_PATH)
if(NOT EXISTS "${LlamaCppPython_INCLUDE_DIR}/ggml-backend.h" OR NOT LlamaCppPython_GGML_BASE)
    message(FATAL_ERROR
        "ggsteer: llama-cpp-python ${LlamaCppPython_VERSION} has no headers in "
        "${LlamaCppPython_INCLUDE_DIR} or no libggml-base in ${LlamaCppPython_LIB_DIR}.")
endif()

# The CUDA backend is a separate library; its presence tells us llama.cpp was built with GGML_CUDA.
if(EXISTS "${LlamaCppPython_LIB_DIR}/libggml-cuda.so")
    set(LlamaCppPython_HAS_CUDA ON)
else()
    set(LlamaCppPython_HAS_CUDA OFF)
endif()

# A fingerprint of the ABI we compile against, checked again at import time.
file(SHA256 "${LlamaCppPython_INCLUDE_DIR}/ggml.h" _h1)
file(SHA256 "${LlamaCppPython_INCLUDE_DIR}/llama.h" _h2)
file(SHA256 "${LlamaCppPython_INCLUDE_DIR}/ggml-backend.h" _h3)
string(SHA256 LlamaCppPython_HEADER_HASH "${_h1}${_h2}${_h3}")

add_library(LlamaCppPython::ggml_base SHARED IMPORTED)
set_target_properties(LlamaCppPython::ggml_base PROPERTIES
    IMPORTED_LOCATION "${LlamaCppPython_GGML_BASE}"
    INTERFACE_INCLUDE_DIRECTORIES "${LlamaCppPython_INCLUDE_DIR}")
set(LlamaCppPython_FOUND TRUE)
message(STATUS "ggsteer: llama-cpp-python ${LlamaCppPython_VERSION} at ${LlamaCppPython_LIB_DIR} (CUDA: ${LlamaCppPython_HAS_CUDA})")
