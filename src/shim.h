// What the C++ shims (src/*.cpp) share: the message of the last libtorch error on this thread,
// which each extern "C" function stores before returning its failure value, and
// csp_tch_last_error() (src/fused_adam.cpp) hands to Rust.
#pragma once

#include <exception>
#include <string>

namespace csp_tch {
// The last error message on this thread.
std::string& last_error();

// Runs `body`; on any C++ exception stores its message and returns `failed`.
template <typename T, typename Body>
T guarded(T failed, Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    last_error() = e.what();
    return failed;
  } catch (...) {
    last_error() = "an unknown C++ exception";
    return failed;
  }
}
}  // namespace csp_tch
