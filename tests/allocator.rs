//! `keep_freed_memory`: a block freed by one batch is there for the next without page faults.
//! Alone in its file, so that this process's allocator starts from glibc's defaults.

fn minor_faults() -> i64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
    usage.ru_minflt
}

/// Minor page faults while allocating and writing `bytes`, then freeing them.
fn faults_of_one_batch(bytes: usize) -> i64 {
    let before = minor_faults();
    let block = std::hint::black_box(vec![1u8; bytes]);
    drop(block);
    minor_faults() - before
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_freed_batch_is_reused_without_page_faults() {
    csp_tch::environment::keep_freed_memory();
    let bytes = 20 << 20;
    let pages = (bytes / 4096) as i64;
    let first = faults_of_one_batch(bytes);
    assert!(first >= pages / 2, "the first block is new memory: {first} faults for {pages} pages");
    // glibc's defaults would have mapped the first block, unmapped it when freed, and served this one
    // from a heap grown page by page.
    for batch in 2..5 {
        let faults = faults_of_one_batch(bytes);
        assert!(faults < pages / 20, "batch {batch}: {faults} faults for {pages} pages");
    }
}
