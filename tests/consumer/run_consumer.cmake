# Drives the packaging tests (cmake -P).
#   MODE=install       install BUILD_DIR to WORK_DIR/prefix, build tests/consumer
#                      against it with find_package, run it
#   MODE=subdirectory  build tests/consumer/subdir, which add_subdirectory()s
#                      SOURCE_DIR, and run it
# Other inputs: SOURCE_DIR, WORK_DIR, CXX_COMPILER, GENERATOR, BUILD_TYPE.
foreach(_var IN ITEMS MODE SOURCE_DIR WORK_DIR CXX_COMPILER GENERATOR BUILD_TYPE)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_consumer.cmake: ${_var} is not set")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _result OUTPUT_VARIABLE _output ERROR_VARIABLE _output)
  message("-- ${what}\n${_output}")
  if(NOT _result EQUAL 0)
    message(FATAL_ERROR "${what} failed (${_result})")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

set(_configure_args
  -G ${GENERATOR}
  -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER})

if(MODE STREQUAL "install")
  if(NOT DEFINED BUILD_DIR)
    message(FATAL_ERROR "run_consumer.cmake: BUILD_DIR is not set")
  endif()
  set(_prefix ${WORK_DIR}/prefix)
  run_step("install ${BUILD_DIR} to ${_prefix}"
           ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${_prefix})
  foreach(_expected IN ITEMS
          include/dynamicid/dynamicid.hpp
          include/dynamicid/version.hpp
          include/dynamicid/backends/cpu.hpp
          share/cmake/dynamicid/dynamicid-config.cmake
          share/cmake/dynamicid/dynamicid-config-version.cmake
          share/cmake/dynamicid/dynamicid-targets.cmake)
    if(NOT EXISTS ${_prefix}/${_expected})
      message(FATAL_ERROR "install did not produce ${_expected}")
    endif()
  endforeach()
  run_step("configure consumer"
           ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build ${_configure_args}
           -DCMAKE_PREFIX_PATH=${_prefix} -DEXPECTED_PREFIX=${_prefix}
           -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
elseif(MODE STREQUAL "subdirectory")
  run_step("configure consumer"
           ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer/subdir -B ${WORK_DIR}/build ${_configure_args}
           -DDYNAMICID_SOURCE_DIR=${SOURCE_DIR})
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()

run_step("build consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run_step("run consumer" ${WORK_DIR}/build/consumer)
