# Builds TARGET in BUILD_DIR and succeeds only if the build fails with output
# matching the regular expression EXPECT.
#   cmake -DBUILD_DIR=... -DTARGET=... -DEXPECT=... [-DCONFIG=...] -P expect_build_failure.cmake
foreach(_var IN ITEMS BUILD_DIR TARGET EXPECT)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "expect_build_failure.cmake: ${_var} is not set")
  endif()
endforeach()
set(_config_args "")
if(CONFIG)
  set(_config_args --config ${CONFIG})
endif()
execute_process(
  COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${TARGET} ${_config_args}
  RESULT_VARIABLE _result
  OUTPUT_VARIABLE _output
  ERROR_VARIABLE _output)
if(_result EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled, but it must be rejected.\n${_output}")
endif()
if(NOT _output MATCHES "${EXPECT}")
  message(FATAL_ERROR "${TARGET} failed to compile, but the diagnostic does not match '${EXPECT}':\n${_output}")
endif()
message("compile-fail OK: ${TARGET} was rejected with a diagnostic matching '${EXPECT}'")
