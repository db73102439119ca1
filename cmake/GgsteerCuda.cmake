# CUDA kernels for ggsteer's interventions.
#
# GGSTEER_CUDA=AUTO compiles them whenever a CUDA compiler is found, so a CUDA build error fails
# the build (and CI) even on machines without a GPU. The CUDA runtime is linked statically: the
# extension still imports where no driver is installed, and only the kernels need a GPU.
# The default architecture is PTX for compute 7.5, which the driver compiles for any newer GPU;
# pass -DCMAKE_CUDA_ARCHITECTURES=90 (say) for native code.

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

macro(_ggsteer_add_cuda target)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
        set(CMAKE_CUDA_ARCHITECTURES "75-virtual")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    target_sources(${target} PRIVATE
        ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops-cuda.cu
        ${CMAKE_CURRENT_SOURCE_DIR}/csrc/hook-cuda.cu)
    target_compile_definitions(${target} PRIVATE GGSTEER_CUDA=1)
    target_link_libraries(${target} PRIVATE CUDA::cudart_static)
    set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
    message(STATUS "ggsteer: CUDA kernels enabled (${CMAKE_CUDA_COMPILER}, architectures ${CMAKE_CUDA_ARCHITECTURES}; llama-cpp-python CUDA: ${LlamaCppPython_HAS_CUDA})")
endmacro()
