fn main() {
    // Die quietly like other command-line tools when the reader of a pipe goes away (`| head`).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    csp_tch::environment::keep_freed_memory();
    std::process::exit(csp_tch::cli::main());
}
