//! The replayer's fallback rules in one process, with the stand-in recorder: a replay runs the
//! recorded index buffer, `--cuda-graphs on` turns a failure into an error, and under `auto` a
//! failure runs that step eagerly, turns graphs off for the rest of the process and later replayers
//! do not try again. One test: the process-wide state it changes would leak into any other.

use csp_tch::train::cuda_graph::{self, Fault, MemoryPoolSlot, Recorder, Replayer, WARMUP_STEPS};
use tch::{Device, Kind, Tensor};

/// Runs `steps` steps through `replayer`, batch `i` being the index tensor `[i]`: the batch each
/// step really ran on, in order, or the error that stopped them.
fn drive(replayer: &mut Replayer, steps: i64) -> anyhow::Result<Vec<i64>> {
    let pool = MemoryPoolSlot::default();
    let mut seen = Vec::new();
    for i in 0..steps {
        let index = Tensor::from_slice(&[i]).to_kind(Kind::Int64);
        replayer.run(&index, &pool, |ran_on: &Tensor| {
            seen.push(ran_on.int64_value(&[0]));
            Ok(())
        })?;
    }
    Ok(seen)
}

#[test]
fn replays_run_the_copied_batch_failures_fall_back_once_and_for_the_whole_process() {
    let every: Vec<i64> = (0..8).collect();
    let simulated = |fault| Replayer::new(Device::Cpu, Recorder::Simulated(fault), true);

    // Replays run on the index buffer with each batch copied in, once per step.
    let mut ok = simulated(Fault::None);
    assert_eq!(drive(&mut ok, 8).unwrap(), every);
    assert_eq!(ok.off_reason(), None);
    // A graph that forgot the copy would replay the batch it was recorded on.
    let stale = drive(&mut simulated(Fault::StaleIndex), 8).unwrap();
    let recorded = WARMUP_STEPS as i64;
    assert_eq!(&stale[..WARMUP_STEPS], &every[..WARMUP_STEPS]);
    assert!(stale[WARMUP_STEPS..].iter().all(|&i| i == recorded), "{stale:?}");

    // Under `on`, a failure is an error naming the flag, and changes nothing for the process.
    for fault in [Fault::Warmup, Fault::Capture, Fault::Replay] {
        let err = drive(&mut Replayer::new(Device::Cpu, Recorder::Simulated(fault), false), 8).err().unwrap();
        assert!(format!("{err:#}").contains("--cuda-graphs on"), "{fault:?}: {err:#}");
    }
    assert_eq!(cuda_graph::fallen_back(), None);

    // Under `auto`, a failed first replay runs that step eagerly: every step exactly once.
    let mut failing = simulated(Fault::Replay);
    assert_eq!(drive(&mut failing, 8).unwrap(), every);
    let reason = failing.off_reason().unwrap();
    assert!(reason.contains("first replay: simulated replay failure"), "{reason}");
    assert_eq!(cuda_graph::fallen_back().as_deref(), Some(reason.as_str()), "off for the whole process");

    // A later replayer does not record again: a stale one would show it.
    let mut later = simulated(Fault::StaleIndex);
    assert_eq!(drive(&mut later, 8).unwrap(), every);
    assert_eq!(later.off_reason().as_deref(), Some(reason.as_str()));
}
