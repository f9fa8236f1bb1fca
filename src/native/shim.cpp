// The shim's error channel (src/native/shim.h): the message of the last C++ exception a shim
// function caught on this thread, handed to Rust by csp_tch_last_error (src/native/mod.rs).
#include "shim.h"

std::string& csp_tch::last_error() {
  thread_local std::string message;
  return message;
}

extern "C" const char* csp_tch_last_error() { return csp_tch::last_error().c_str(); }
