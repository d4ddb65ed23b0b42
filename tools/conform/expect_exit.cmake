# Runs COMMAND with ARGS (arguments separated by '|') and fails unless it exits with EXPECT and,
# when MATCH is set, its output matches the regular expression MATCH.
#   cmake -DCOMMAND=prog "-DARGS=a|b" -DEXPECT=2 [-DMATCH=regex] -P expect_exit.cmake
string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${COMMAND} ${args}
                RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT status EQUAL EXPECT)
  message(FATAL_ERROR "expected exit status ${EXPECT}, got ${status}")
endif()
if(DEFINED MATCH AND NOT "${out}${err}" MATCHES "${MATCH}")
  message(FATAL_ERROR "output does not match '${MATCH}'")
endif()
