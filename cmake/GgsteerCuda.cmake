# CUDA kernels for ggsteer's interventions.
#
# GGSTEER_CUDA=AUTO compiles them whenever a CUDA compiler is found, so a CUDA build error fails
# the build (and CI) even on machines without a GPU. The CUDA runtime is linked statically: the
# extension still imports where no driver is installed, and only the kernels need a GPU.
# The default architectures carry machine code (SASS) for Turing, Ampere, Ada and Hopper, which
# runs without the driver compiling anything, plus PTX for 9.0 that newer GPUs compile at load
# (PTX alone fails wherever the driver is older than nvcc: it cannot read newer PTX).
# GGSTEER_CUDA_ARCHITECTURES (or CMAKE_CUDA_ARCHITECTURES) picks others; the hook checks at run
# time that the kernel loads on the tensor's GPU, and uses ggml's copy path where it does not.

include(CheckLanguage)

# A macro, not a function: enable_language must run in the top-level scope.
macro(ggsteer_enable_cuda target)
    if(GGSTEER_CUDA_MODE STREQUAL "OFF")
        message(STATUS "ggsteer: CUDA kernels disabled (GGSTEER_CUDA=OFF)")
    else()
        check_language(CUDA)
        if(CMAKE_CUDA_COMPILER)
            _ggsteer_add_cuda(${target})
        elseif(GGSTEER_CUDA_MODE STREQUAL "ON")
            message(FATAL_ERROR "ggsteer: GGSTEER_CUDA=ON but no CUDA compiler was found")
        else()
            message(STATUS "ggsteer: no CUDA compiler, CUDA kernels not built (host and copy paths only)")
        endif()
    endif()
endmacro()

set(GGSTEER_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90"
    CACHE STRING "CUDA architectures of the intervention kernels (\"90\" is SASS and PTX for 9.0)")

macro(_ggsteer_add_cuda target)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
        set(CMAKE_CUDA_ARCHITECTURES "${GGSTEER_CUDA_ARCHITECTURES}")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    target_sources(${target} PRIVATE
        ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops-cuda.cu
        ${CMAKE_CURRENT_SOURCE_DIR}/csrc/hook-cuda.cu)
    # a list's semicolons would split the definition: build_info reports it comma-separated
    string(REPLACE ";" "," _ggsteer_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
    target_compile_definitions(${target} PRIVATE GGSTEER_CUDA=1 GGSTEER_CUDA_ARCHITECTURES="${_ggsteer_cuda_archs}")
    target_link_libraries(${target} PRIVATE CUDA::cudart_static)
    set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
    message(STATUS "ggsteer: CUDA kernels enabled (${CMAKE_CUDA_COMPILER}, architectures ${CMAKE_CUDA_ARCHITECTURES}; llama-cpp-python CUDA: ${LlamaCppPython_HAS_CUDA})")
endmacro()
