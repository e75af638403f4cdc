# One static library per lib/ folder; sources are globbed so that a new file needs no CMake edit.
# Every C++ file of our targets gets one shared precompiled header (ATen), built once (qt_pch).
add_library(qt_pch OBJECT ${CMAKE_CURRENT_LIST_DIR}/pch.cpp)
set_target_properties(qt_pch PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_link_libraries(qt_pch PUBLIC ${TORCH_LIBRARIES})
target_compile_options(qt_pch PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
target_precompile_headers(qt_pch PRIVATE <ATen/ATen.h>)

function(qt_target_defaults target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
  # The shared PCH is built with -fPIC; executables would get -fPIE and reject it, so they get -fPIC too.
  get_target_property(type ${target} TYPE)
  if(type STREQUAL "EXECUTABLE")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fPIC>)
    # libtorch.so exports its own copy of std::filesystem (seen: its remove_all jumps to address 0). Naming
    # libstdc++ first makes the dynamic linker resolve std:: symbols there, before libtorch.so.
    target_link_options(${target} PRIVATE -Wl,--push-state,--no-as-needed -lstdc++ -Wl,--pop-state)
  else()
    set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  endif()
  target_precompile_headers(${target} REUSE_FROM qt_pch)
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR})
endfunction()

function(qt_library target dir)
  file(GLOB srcs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/${dir}/*.cpp)
  list(FILTER srcs EXCLUDE REGEX "/log\\.cpp$")  # built apart, without torch's include path (qt_log)
  if(QT_CUDA)
    file(GLOB cu_srcs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/${dir}/*.cu)
    list(APPEND srcs ${cu_srcs})
  endif()
  if(NOT srcs)
    set(srcs ${PROJECT_SOURCE_DIR}/cmake/pch.cpp)  # a floor with no code yet still forms its target
  endif()
  add_library(${target} STATIC ${srcs})
  qt_target_defaults(${target})
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${target} PUBLIC ${TORCH_LIBRARIES} ${ARGN})
  if(QT_CUDA)
    target_compile_definitions(${target} PUBLIC QT_WITH_CUDA=1)
    set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
  endif()
endfunction()
