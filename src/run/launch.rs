//! `--nproc-per-node N`: a data-parallel run on this machine without torchrun. csp-tch starts N
//! workers of the same command (without the flag) with the variables torchrun would set (`RANK`,
//! `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`),
//! forwards the signals it gets to them, and, as torchrun does, stops the others once one fails.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Set in each worker's environment to the number of workers, so that a stopped run's resume
/// command can be given as the user started it (with `--nproc-per-node`).
pub const WORKERS_ENV: &str = "CSP_TCH_NPROC_PER_NODE";

/// Signals the launcher has received (each forwarded to the workers once).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// `args` (the command line after the program's name) without `--nproc-per-node N` or
/// `--nproc-per-node=N`.
pub fn worker_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == "--nproc-per-node" {
            skip_value = true;
        } else if !arg.starts_with("--nproc-per-node=") {
            out.push(arg.clone());
        }
    }
    out
}

/// A port on 127.0.0.1 that nothing listens on now (the system's pick; rank 0's store takes it).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The OpenMP threads of each of `workers` on this machine when the user set none: its cores
/// shared out (torchrun sets 1; sharing keeps a CPU run as fast as the cores allow).
fn threads_per_worker(workers: usize) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers).max(1).to_string()
}

/// Starts `workers` workers of this command with `args`, waits for all of them and fails when one
/// did, naming it. `timeout`: how long the others may take to stop by themselves once one has failed
/// (their `--dist-timeout`), before they are killed.
pub fn launch(workers: usize, args: &[String], timeout: Duration) -> Result<()> {
    let exe = std::env::current_exe().context("finding csp-tch's own executable")?;
    let port = free_port()?;
    eprintln!("launching {workers} data-parallel workers on 127.0.0.1:{port}");
    let _ = ctrlc::set_handler(|| {
        SIGNALS.fetch_add(1, Ordering::SeqCst);
    });
    let mut children: Vec<Child> = Vec::with_capacity(workers);
    for rank in 0..workers {
        let mut command = Command::new(&exe);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("GROUP_RANK", "0")
            .env("WORLD_SIZE", workers.to_string())
            .env("LOCAL_WORLD_SIZE", workers.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(WORKERS_ENV, workers.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE");
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", threads_per_worker(workers));
        }
        // Their own process group: a Ctrl-C on the terminal reaches the launcher, which forwards it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(err) => {
                stop_all(&mut children, libc::SIGKILL);
                bail!("starting worker {rank} ({}): {err}", exe.display());
            }
        }
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; workers];
    let (mut forwarded, mut first_failure): (usize, Option<(usize, Instant)>) = (0, None);
    while statuses.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_none() {
                if let Some(status) = child.try_wait()? {
                    statuses[rank] = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((rank, Instant::now()));
                    }
                }
            }
        }
        let signals = SIGNALS.load(Ordering::SeqCst);
        while forwarded < signals {
            forward(&children, &statuses, libc::SIGTERM);
            forwarded += 1;
        }
        if let Some((_, since)) = first_failure {
            // The others stop by themselves when their next collective fails; killed if they hang.
            if since.elapsed() > timeout + Duration::from_secs(10) {
                forward(&children, &statuses, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter_map(|(rank, s)| s.filter(|s| !s.success()).map(|s| format!("rank {rank} ({})", describe(s))))
        .collect();
    match first_failure {
        None => Ok(()),
        Some(_) if signals_stopped(&statuses) && forwarded > 0 => Err(crate::train::Interrupted.into()),
        Some((rank, _)) => bail!(
            "the data-parallel run failed: rank {rank} failed first; failed: {} (each rank's error is above)",
            failed.join(", ")
        ),
    }
}

/// Whether every worker ended as a stopped run does (exit status 130).
fn signals_stopped(statuses: &[Option<ExitStatus>]) -> bool {
    statuses.iter().flatten().all(|s| s.success() || s.code() == Some(130))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Sends `signal` to every worker still running.
fn forward(children: &[Child], statuses: &[Option<ExitStatus>], signal: i32) {
    for (child, status) in children.iter().zip(statuses) {
        if status.is_none() {
            // SAFETY: a pid of a child not yet reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }
}

fn stop_all(children: &mut [Child], signal: i32) {
    for child in children.iter_mut() {
        // SAFETY: as in `forward`.
        unsafe { libc::kill(child.id() as i32, signal) };
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::worker_args;

    #[test]
    fn workers_get_the_command_without_the_launch_flag() {
        let args: Vec<String> =
            "run-all --nproc-per-node 2 --epochs 1 --nproc-per-node=3 --out x".split(' ').map(String::from).collect();
        assert_eq!(worker_args(&args), ["run-all", "--epochs", "1", "--out", "x"]);
    }
}
