// What the C++ shims (src/native/*.cpp) share: every extern "C" function runs its body through
// `guarded`, so that no C++ exception crosses into Rust; the exception's message stays in
// last_error() (src/native/shim.cpp) for csp_tch_last_error() to hand to Rust.
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
