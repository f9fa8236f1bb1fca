//! Data-parallel training with `DistributedDataParallel`'s semantics, on c10d's own process groups
//! (Gloo across CPU processes, NCCL across GPUs; [`crate::native::ProcessGroup`]):
//! - every parameter and buffer broadcast from rank 0 before the first step, so all ranks start alike;
//! - each step's gradients averaged over the ranks by a bucketed allreduce, as DDP's reducer does it
//!   (each gradient times 1/world while copied into its bucket, then summed), before fp16 unscaling,
//!   clipping and the optimizer, which then run alike on every rank;
//! - BatchNorm statistics local to each rank (DDP's default), rank 0's broadcast before an evaluation
//!   and a checkpoint, as DDP's `broadcast_buffers` gives rank 0's at the start of every forward;
//! - `DistributedSampler`'s shards of each epoch's shuffle, and evaluation sharded so that each test
//!   image counts once, its sums added over the ranks;
//! - on NCCL, a training step's collectives ordered on the device, so that a CUDA graph records the
//!   step with its allreduce ([`graph_obstacle`] says when it cannot), the step's end waited for with
//!   the timeout.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

use crate::config::{CudaGraphs, DataParallel, DistBackend, DistOverlap, Execution};
use crate::environment::{ParallelEnvironment, RunEnvironment};
use crate::models::sync_bn::SyncBatchNorm;
use crate::native::{CudaEvent, GroupBackend, OverlappedAllreduce, ProcessGroup, Rendezvous};
use crate::train::cuda_graph;

/// Whether this build has c10d's NCCL process group (`--dist-backend nccl`).
pub use crate::native::nccl_built;

/// DDP's `bucket_cap_mb` (25 MB) and the first bucket's smaller size (`_DEFAULT_FIRST_BUCKET_BYTES`).
const BUCKET_BYTES: i64 = 25 << 20;
const FIRST_BUCKET_BYTES: i64 = 1 << 20;

/// How long a rank watches the others' heartbeats (counted up twice a second) after a collective
/// failed, to tell which are gone.
const HEARTBEAT_WAIT: std::time::Duration = std::time::Duration::from_millis(2500);

/// Why `--sync-bn`'s steps run eagerly.
const SYNC_BN_EAGER: &str =
    "--sync-bn's steps run eagerly: its forward pass reads the global batch's size back from the device";

/// Why the training steps of a data-parallel rank on `device` over `backend` cannot be recorded in a
/// CUDA graph, if they cannot: `--sync-bn`, or Gloo's collectives on CUDA tensors (through the host).
pub fn graph_obstacle(device: Device, backend: DistBackend, sync_bn: bool) -> Option<&'static str> {
    if sync_bn {
        Some(SYNC_BN_EAGER)
    } else if device.is_cuda() && backend == DistBackend::Gloo {
        Some("Gloo sums CUDA tensors through the host, which a recorded step cannot wait for; use --dist-backend nccl")
    } else {
        None
    }
}

/// Refuses, before any rank starts, what no data-parallel step computed as `execution` says can
/// do: `--cuda-graphs on` with `--sync-bn`.
pub fn check_execution(execution: &Execution, sync_bn: bool) -> Result<()> {
    if execution.cuda_graphs == CudaGraphs::On && sync_bn {
        return Err(cuda_graph::refused_on(SYNC_BN_EAGER));
    }
    Ok(())
}

/// The device of rank `place` under `--device spec` (CUDA device `LOCAL_RANK` under `auto`, where CUDA
/// is available, or `cuda`; the CPU under `cpu`), and `place` with its backend resolved for it, once
/// `execution` is one its steps can run (with `--sync-bn` or not).
pub fn rank_device(
    spec: &str,
    execution: &Execution,
    place: DataParallel,
    sync_bn: bool,
) -> Result<(Device, DataParallel)> {
    check_execution(execution, sync_bn)?;
    let device = match spec {
        "auto" | "cuda" if tch::Cuda::is_available() || spec == "cuda" => {
            crate::environment::parse_device(&format!("cuda:{}", place.local_rank))?
        }
        "auto" | "cpu" => Device::Cpu,
        other => bail!(
            "--device {other} in a data-parallel run: each rank computes on cuda:LOCAL_RANK; use --device auto, \
             cuda or cpu"
        ),
    };
    let backend = place.backend.resolve(device.is_cuda(), nccl_built())?;
    let obstacle = graph_obstacle(device, backend, sync_bn);
    cuda_graph::plan(execution.cuda_graphs, device, execution.precision(device), obstacle)?;
    Ok((device, DataParallel { backend, ..place }))
}

/// A joined data-parallel group and this process's place in it.
pub struct Group {
    group: Arc<ProcessGroup>,
    pub place: DataParallel,
    /// The device this rank computes on.
    pub device: Device,
}

impl Group {
    /// Joins the group `place` describes (every rank must, within the timeout), computing on `device`.
    pub fn join(place: &DataParallel, device: Device) -> Result<Group> {
        let backend = match (place.backend, device) {
            (DistBackend::Nccl, Device::Cuda(index)) => GroupBackend::Nccl(index),
            (DistBackend::Nccl, _) => bail!("--dist-backend nccl needs a CUDA device, this rank runs on the CPU"),
            _ => GroupBackend::Gloo,
        };
        let interface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        // A run on one machine (the master on a loopback address) talks over loopback only.
        let loopback = matches!(place.master_addr.as_str(), "localhost" | "127.0.0.1" | "::1");
        let prefix = format!("/csp-tch/attempt_{}/", place.attempt);
        let rendezvous = Rendezvous {
            host: &place.master_addr,
            port: place.master_port,
            rank: place.rank,
            world_size: place.world_size,
            host_store: !place.agent_store,
            prefix: &prefix,
            timeout: place.timeout,
            backend,
            gloo_host: if loopback { "127.0.0.1" } else { "" },
            gloo_interface: &interface,
        };
        let group = ProcessGroup::join(&rendezvous).with_context(|| {
            format!(
                "rank {} of {} could not join the data-parallel group at {}:{} within --dist-timeout {} s",
                place.rank,
                place.world_size,
                place.master_addr,
                place.master_port,
                place.timeout.as_secs_f64()
            )
        })?;
        Ok(Group { group: Arc::new(group), place: place.clone(), device })
    }

    pub fn rank(&self) -> usize {
        self.place.rank
    }

    pub fn world_size(&self) -> usize {
        self.place.world_size
    }

    /// Whether gradients are summed during the backward pass (`--dist-overlap on`).
    pub fn overlaps(&self) -> bool {
        self.place.overlap == DistOverlap::On
    }

    /// `--sync-bn`'s BatchNorm statistics over this group.
    pub fn sync_batch_norm(&self) -> SyncBatchNorm {
        SyncBatchNorm::new(self.group.clone(), self.rank(), self.world_size())
    }

    /// [`Group::failed`] followed by c10d's own message `cause`.
    pub fn failed_message(&self, what: &str, cause: &str) -> String {
        format!("{}: {cause}", self.failed(what))
    }

    /// What a failed collective or store read says: which rank saw it, and which ranks are gone
    /// (their heartbeats stopped) or that all are alive and one is slow.
    fn failed(&self, what: &str) -> String {
        let who = match self.group.silent_ranks(self.world_size(), HEARTBEAT_WAIT) {
            Ok(silent) if silent.is_empty() => format!(
                "every rank is still alive, so one did not answer within --dist-timeout {} s",
                self.place.timeout.as_secs_f64()
            ),
            Ok(silent) => {
                let ranks: Vec<String> = silent.iter().map(|r| format!("rank {r}")).collect();
                format!("{} stopped (exited, killed or hung)", ranks.join(", "))
            }
            Err(_) if self.place.agent_store => "torchrun's store cannot be reached".to_string(),
            Err(_) => "rank 0, which hosts the group's store, is gone".to_string(),
        };
        format!("rank {} of {}: {what} failed: {who}", self.rank(), self.world_size())
    }

    /// Overwrites each of `tensors` with rank 0's.
    pub fn broadcast_from_first(&self, tensors: &[Tensor], what: &str) -> Result<()> {
        for tensor in tensors {
            self.group.broadcast(tensor, 0).with_context(|| self.failed(what))?;
        }
        Ok(())
    }

    /// Replaces each of `tensors` by its sum over the ranks.
    pub fn sum(&self, tensors: &[&Tensor], what: &str) -> Result<()> {
        for tensor in tensors {
            self.group.all_reduce_sum(tensor).with_context(|| self.failed(what))?;
        }
        Ok(())
    }

    /// Replaces `tensor` by its sum over the ranks within a training step: on NCCL the device waits
    /// for the sum, not the host ([`Group::wait_for_device`] after the step).
    fn sum_in_step(&self, tensor: &Tensor, what: &str) -> Result<()> {
        self.group.all_reduce_sum_in_step(tensor).with_context(|| self.failed(what))
    }

    /// Every rank's `failed` for `what`: the ranks where it is true (every rank must call this).
    pub fn failed_ranks(&self, failed: bool, what: &str) -> Result<Vec<usize>> {
        let flags = Tensor::zeros([self.world_size() as i64], (Kind::Float, self.device));
        let _ = flags.get(self.rank() as i64).fill_(f64::from(u8::from(failed)));
        self.sum(&[&flags], what)?;
        let flags = Vec::<f32>::try_from(flags.to_device(Device::Cpu))?;
        Ok(flags.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(rank, _)| rank).collect())
    }

    /// Waits until this rank's device has run the step queued on it, its collectives included, up
    /// to the timeout: on NCCL, whose step collectives the host does not wait for (elsewhere they
    /// were waited for, with the timeout, within the step).
    pub fn wait_for_device(&self, what: &str) -> Result<()> {
        let (DistBackend::Nccl, Device::Cuda(index)) = (self.place.backend, self.device) else { return Ok(()) };
        let done = CudaEvent::new(index)?;
        done.record()?;
        let deadline = std::time::Instant::now() + self.place.timeout;
        while !done.is_done()? {
            if std::time::Instant::now() > deadline {
                self.group.abort();
                return Err(anyhow::anyhow!("timed out").context(self.failed(what)));
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(())
    }

    /// Waits until every rank has come here.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.sum(&[&Tensor::zeros([1], (Kind::Float, self.device))], what)
    }

    /// Every rank's `value` for `what`, by rank (through the store).
    fn gather(&self, what: &str, value: &str) -> Result<Vec<String>> {
        let key = |rank: usize| format!("gather/{what}/{rank}");
        self.group.store_set(&key(self.rank()), value.as_bytes()).with_context(|| self.failed(what))?;
        (0..self.world_size())
            .map(|rank| {
                let reading = || self.failed(&format!("reading rank {rank}'s {what}"));
                let bytes = self.group.store_get(&key(rank)).with_context(reading)?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            })
            .collect()
    }

    /// The run's backend, world size and every rank's device (`this` is this rank's environment).
    pub fn environment(&self, this: &RunEnvironment) -> Result<ParallelEnvironment> {
        let device = match this.device.as_str() {
            "cpu" => this.device.clone(),
            label => format!("{label} ({})", this.device_name),
        };
        Ok(ParallelEnvironment {
            backend: self.place.backend.label().to_string(),
            world_size: self.world_size(),
            devices: self.gather("device", &device)?,
            allreduce_overlapped: self.overlaps(),
        })
    }

    /// Refuses to go on unless every rank has the same `value` for `what` (its run settings, its data):
    /// each rank publishes its own and compares it with rank 0's, naming the fields that differ.
    pub fn check_same(&self, what: &str, value: &serde_json::Value) -> Result<()> {
        let values = self.gather(what, &value.to_string())?;
        let first: serde_json::Value = serde_json::from_str(&values[0])?;
        let differences = differing_fields(&first, value);
        if !differences.is_empty() {
            bail!(
                "rank {} of {} was started with other {what} than rank 0 ({}); start every rank with the same \
                 flags and data",
                self.rank(),
                self.world_size(),
                differences.join("; ")
            );
        }
        Ok(())
    }
}

/// The fields (`a.b.c`) where `first` and `ours` differ, with both values.
fn differing_fields(first: &serde_json::Value, ours: &serde_json::Value) -> Vec<String> {
    fn walk(path: String, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for key in keys {
                    let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(child, x.get(key), y.get(key), out);
                }
            }
            (a, b) if a != b => {
                let show = |v: Option<&serde_json::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
                out.push(format!("{path}: rank 0 {}, this rank {}", show(a), show(b)));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(String::new(), Some(first), Some(ours), &mut out);
    out
}

/// Rank `rank`'s share of an epoch's `order`, as `DistributedSampler` (shuffle done, `drop_last`
/// off) takes it: the order padded with its own head to a multiple of `world`, then every
/// `world`-th index from `rank`. Every rank gets the same number of images, so the same steps.
pub fn shard(order: &[i64], rank: usize, world: usize) -> Vec<i64> {
    let total = order.len().div_ceil(world) * world;
    let padded = order.iter().cycle().take(total);
    padded.skip(rank).step_by(world).copied().collect()
}

/// Rank `rank`'s share of `0..n` for evaluation: every `world`-th image from `rank`, unpadded, so
/// that the ranks' sums count each image exactly once.
pub fn eval_shard(n: usize, rank: usize, world: usize) -> Vec<i64> {
    (rank..n).step_by(world).map(|i| i as i64).collect()
}

/// One flat buffer of gradients that are summed over the ranks together.
struct Bucket {
    flat: Tensor,
    /// `(parameter index, offset, elements)` of each member.
    members: Vec<(usize, i64, i64)>,
}

/// DDP's buckets over `params`, filled in `order` (parameter indices): at most `cap` bytes each (the
/// first `first_cap`), one dtype each, their flat buffers zeroed; the last holds one element more,
/// the stop vote.
fn buckets(params: &[Tensor], order: impl Iterator<Item = usize>, (first_cap, cap): (i64, i64)) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    // The bucket being filled for each dtype.
    let mut filling: BTreeMap<String, Bucket> = BTreeMap::new();
    for index in order {
        let param = &params[index];
        let key = format!("{:?}", param.kind());
        let bucket = filling.entry(key.clone()).or_insert_with(|| Bucket {
            flat: Tensor::empty([0], (param.kind(), param.device())),
            members: Vec::new(),
        });
        let offset = bucket.members.last().map_or(0, |&(_, offset, numel)| offset + numel);
        bucket.members.push((index, offset, param.numel() as i64));
        let bytes = (offset + param.numel() as i64) * param.kind().elt_size_in_bytes() as i64;
        if bytes >= if buckets.is_empty() { first_cap } else { cap } {
            buckets.push(filling.remove(&key).expect("filling"));
        }
    }
    buckets.extend(filling.into_values());
    let count = buckets.len();
    for (b, bucket) in buckets.iter_mut().enumerate() {
        let elements = bucket.members.last().map_or(0, |&(_, offset, numel)| offset + numel);
        let vote = i64::from(b + 1 == count);
        bucket.flat = Tensor::zeros([elements + vote], (bucket.flat.kind(), bucket.flat.device()));
    }
    buckets
}

/// The gradient averaging of one model, DDP's reducer: buckets of at most 25 MB (the first 1 MB),
/// their flat buffers kept from step to step, each gradient times 1/world while copied into its
/// bucket, then each bucket summed over the ranks. Summed after the backward pass, or during it
/// (`--dist-overlap`): then a hook on each parameter fills its bucket as the backward pass produces
/// its gradient, and a bucket is summed as soon as it is full, while the pass goes on. A stop request
/// rides in the last bucket as one more element, so that every rank learns of it at the same step.
///
/// What a step runs on the device reads nothing back and writes no value from the host, so that a
/// CUDA graph can record it: the vote is set before the step ([`GradientAverager::set_vote`]) and
/// read after it ([`GradientAverager::stop_voted`]).
pub struct GradientAverager {
    buckets: Vec<Bucket>,
    /// This rank's vote to stop, copied into the last bucket at the step's start.
    vote: Tensor,
    world: f64,
    /// Bucket sizes in bytes: the first, the others.
    caps: (i64, i64),
    overlap: Option<Overlap>,
    stats: AllreduceStats,
}

/// `--dist-overlap`'s hooks and where their buckets stand.
struct Overlap {
    hooks: OverlappedAllreduce,
    /// Whether the buckets have been laid out in the order the gradients come (after the first step,
    /// as DDP rebuilds its buckets once): before, a bucket may wait for a gradient that comes last.
    rebuilt: bool,
}

/// What the gradient allreduce cost since [`GradientAverager::take_stats`] was last called.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AllreduceStats {
    /// Time the step waited for the sums (the slowest rank included): the whole allreduce when it
    /// follows the backward pass, what is left of it after the pass when overlapped.
    pub seconds: f64,
    pub steps: usize,
    /// Buckets summed, and of those, launched while the backward pass still computed (overlapped:
    /// before its last gradient came).
    pub buckets: usize,
    pub launched_during_backward: usize,
}

impl GradientAverager {
    /// Buckets for `params` (in the optimizer's order) in reverse order, as DDP lays them out first,
    /// summed over `world` ranks; with hooks on the parameters over `overlap_over` when given.
    pub fn new(params: &[Tensor], world: usize, overlap_over: Option<&Group>) -> Result<GradientAverager> {
        Self::with_caps(params, world, overlap_over, (FIRST_BUCKET_BYTES, BUCKET_BYTES))
    }

    /// As [`GradientAverager::new`], with buckets of `caps` bytes (the first, the others).
    pub fn with_caps(
        params: &[Tensor],
        world: usize,
        overlap_over: Option<&Group>,
        caps: (i64, i64),
    ) -> Result<GradientAverager> {
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        let mut averager = GradientAverager {
            buckets: buckets(params, (0..params.len()).rev(), caps),
            vote: Tensor::zeros([1], (Kind::Float, device)),
            world: world as f64,
            caps,
            overlap: None,
            stats: AllreduceStats::default(),
        };
        if let Some(group) = overlap_over {
            let hooks = averager.hooks(&group.group, params)?;
            averager.overlap = Some(Overlap { hooks, rebuilt: false });
        }
        Ok(averager)
    }

    /// Hooks on `params` that fill this averager's buckets.
    fn hooks(&self, group: &Arc<ProcessGroup>, params: &[Tensor]) -> Result<OverlappedAllreduce> {
        let (mut buckets_of, mut offsets) = (vec![0; params.len()], vec![0; params.len()]);
        for (b, bucket) in self.buckets.iter().enumerate() {
            for &(index, offset, _) in &bucket.members {
                (buckets_of[index], offsets[index]) = (b, offset);
            }
        }
        let flats: Vec<Tensor> = self.buckets.iter().map(|b| b.flat.shallow_clone()).collect();
        OverlappedAllreduce::new(group.clone(), params, &buckets_of, &offsets, &flats, 1.0 / self.world)
    }

    /// The allreduce's cost since the last call.
    pub fn take_stats(&mut self) -> AllreduceStats {
        std::mem::take(&mut self.stats)
    }

    /// Before a step (outside what a CUDA graph records): this rank's vote to stop after it.
    pub fn set_vote(&mut self, stop: bool) {
        let _ = self.vote.fill_(f64::from(u8::from(stop)));
    }

    /// The last element of the last bucket: the votes' sum after the allreduce.
    fn vote_slot(&self) -> Tensor {
        let last = &self.buckets.last().expect("a bucket").flat;
        last.narrow(0, last.numel() as i64 - 1, 1)
    }

    /// Before the backward pass of a step: the vote goes into its bucket; with overlap, the hooks
    /// are armed.
    pub fn begin(&mut self) {
        self.vote_slot().copy_(&self.vote);
        if let Some(overlap) = &self.overlap {
            overlap.hooks.arm();
        }
    }

    /// After the backward pass: replaces each of `grads` (one per parameter of `params`; an
    /// undefined one counts as zeros, as DDP's unused parameters do not, which csp-tch's models never
    /// have) by its mean over the ranks.
    pub fn average(&mut self, group: &Group, params: &[Tensor], grads: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let started = std::time::Instant::now();
        match &self.overlap {
            Some(overlap) => {
                let during = overlap.hooks.finish().with_context(|| group.failed("the gradient allreduce"))?;
                self.stats.launched_during_backward += during;
            }
            None => {
                for bucket in &self.buckets {
                    for &(index, offset, numel) in &bucket.members {
                        let mut view = bucket.flat.narrow(0, offset, numel);
                        match &grads[index] {
                            grad if grad.defined() => view.copy_(&(grad.reshape([-1]) * (1.0 / self.world))),
                            _ => drop(view.zero_()),
                        }
                    }
                    group.sum_in_step(&bucket.flat, "the gradient allreduce")?;
                }
            }
        }
        self.stats.seconds += started.elapsed().as_secs_f64();
        self.stats.steps += 1;
        self.stats.buckets += self.buckets.len();
        for bucket in &self.buckets {
            for &(index, offset, numel) in &bucket.members {
                let grad = &grads[index];
                if grad.defined() {
                    let mut target = grad.shallow_clone();
                    target.copy_(&bucket.flat.narrow(0, offset, numel).view_as(grad));
                }
            }
        }
        if self.overlap.as_ref().is_some_and(|o| !o.rebuilt) {
            let votes = self.vote_slot().copy();
            self.rebuild(group, params)?;
            self.vote_slot().copy_(&votes);
        }
        Ok(())
    }

    /// After a step (eager or replayed): whether any rank voted to stop, once the device has run it
    /// (waiting up to the group's timeout).
    pub fn stop_voted(&self, group: &Group) -> Result<bool> {
        group.wait_for_device("the training step's gradient allreduce")?;
        Ok(self.vote_slot().double_value(&[0]) > 0.0)
    }

    /// Lays the buckets out in the order the gradients came in the step just taken (rank 0's, so
    /// that every rank has the same buckets), as DDP's `_rebuild_buckets` after its first iteration.
    fn rebuild(&mut self, group: &Group, params: &[Tensor]) -> Result<()> {
        let overlap = self.overlap.take().expect("overlapped");
        let mut order = overlap.hooks.ready_order();
        // Parameters that got no gradient go last, in reverse order.
        let came: std::collections::BTreeSet<usize> = order.iter().copied().collect();
        order.extend((0..params.len()).rev().filter(|p| !came.contains(p)));
        let shared = Tensor::from_slice(&order.iter().map(|&p| p as i64).collect::<Vec<i64>>());
        let shared = shared.to_device(group.device);
        group.broadcast_from_first(std::slice::from_ref(&shared), "sharing rank 0's bucket order")?;
        let order: Vec<usize> =
            Vec::<i64>::try_from(shared.to_device(Device::Cpu))?.into_iter().map(|p| p as usize).collect();
        drop(overlap);
        self.buckets = buckets(params, order.into_iter(), self.caps);
        let hooks = self.hooks(&group.group, params)?;
        self.overlap = Some(Overlap { hooks, rebuilt: true });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{eval_shard, shard, GradientAverager, Group};
    use crate::config::{DataParallel, DistBackend, DistOverlap};
    use tch::{Device, Kind, Tensor};

    /// The weights of four 64x64 layers, the first layer listed last: DDP's first layout (the reverse
    /// of the parameter order) then puts the gradient that comes last in the first bucket.
    fn layers() -> Vec<Tensor> {
        (0..4)
            .rev()
            .map(|l| {
                ((Tensor::arange(64 * 64, (Kind::Float, Device::Cpu)) * (0.37 + l as f64)).sin() * 0.2)
                    .reshape([64, 64])
                    .set_requires_grad(true)
            })
            .collect()
    }

    /// The layers applied in turn (first to last) to rank `rank`'s inputs of step `step`, summed.
    fn loss(layers: &[Tensor], rank: usize, step: usize) -> Tensor {
        let x = (Tensor::arange(8 * 64, (Kind::Float, Device::Cpu)) * (1.3 + rank as f64 + 0.1 * step as f64)).cos();
        let x = layers.iter().rev().fold(x.reshape([8, 64]), |x, w| x.matmul(w).tanh());
        x.square().sum(Kind::Float)
    }

    #[test]
    fn overlapped_buckets_sum_what_the_plain_averaging_sums_and_launch_early_once_rebuilt() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // One layer's gradient (16 KB) fills a bucket: four buckets.
        let caps = (1 << 10, 4 << 10);
        let rank = |rank: usize| {
            let place = DataParallel {
                rank,
                world_size: 2,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                agent_store: false,
                attempt: 0,
                backend: DistBackend::Gloo,
                overlap: DistOverlap::On,
                timeout: std::time::Duration::from_secs(30),
            };
            let group = Group::join(&place, Device::Cpu).unwrap();
            let params = layers();
            let mut plain = GradientAverager::with_caps(&params, 2, None, caps).unwrap();
            let mut overlapped = GradientAverager::with_caps(&params, 2, Some(&group), caps).unwrap();
            let (mut early, mut last) = (Vec::new(), None);
            for step in 0..3 {
                // Rank 1 votes to stop at step 2: both ranks learn it there.
                let stop = rank == 1 && step == 2;
                let grads = Tensor::run_backward(&[loss(&params, rank, step)], &params, false, false);
                let raw: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
                plain.set_vote(stop);
                plain.begin();
                plain.average(&group, &params, &grads).unwrap();
                let plain_stop = plain.stop_voted(&group).unwrap();
                overlapped.set_vote(stop);
                overlapped.begin();
                let hooked = Tensor::run_backward(&[loss(&params, rank, step)], &params, false, false);
                overlapped.average(&group, &params, &hooked).unwrap();
                let overlapped_stop = overlapped.stop_voted(&group).unwrap();
                assert_eq!((plain_stop, overlapped_stop), (step == 2, step == 2), "rank {rank} step {step}");
                for (a, b) in grads.iter().zip(&hooked) {
                    assert!(a.equal(b), "rank {rank} step {step}: the overlapped sums differ");
                }
                let stats = overlapped.take_stats();
                assert_eq!((stats.steps, stats.buckets), (1, 4));
                early.push(stats.launched_during_backward);
                last = Some((raw, grads));
            }
            let (raw, averaged) = last.unwrap();
            (early, raw, averaged)
        };
        let (zero, one) = std::thread::scope(|s| {
            let zero = s.spawn(|| rank(0));
            let one = s.spawn(|| rank(1));
            (zero.join().unwrap(), one.join().unwrap())
        });
        // First laid out in reverse parameter order, bucket 0 waits for the first layer's gradient,
        // which comes last: nothing goes early. Rebuilt in the order gradients came, three of the
        // four buckets are summed while the backward pass computes the rest.
        assert_eq!(zero.0, vec![0, 3, 3]);
        assert_eq!(one.0, vec![0, 3, 3]);
        // Both ranks hold the mean of their gradients (halving is exact, so to the bit).
        for p in 0..4 {
            let mean = &zero.1[p] * 0.5 + &one.1[p] * 0.5;
            assert!(!zero.1[p].equal(&one.1[p]), "the ranks' own gradients differ");
            assert!(zero.2[p].equal(&mean) && one.2[p].equal(&mean), "parameter {p}: not the mean over the ranks");
        }
    }

    #[test]
    fn shards_pad_with_the_head_of_the_order_and_take_every_world_th_index() {
        // DistributedSampler: 10 indices over 4 ranks are padded to 12 with the first two.
        let order: Vec<i64> = vec![9, 3, 7, 1, 0, 8, 2, 6, 4, 5];
        assert_eq!(shard(&order, 0, 4), vec![9, 0, 4]);
        assert_eq!(shard(&order, 1, 4), vec![3, 8, 5]);
        assert_eq!(shard(&order, 2, 4), vec![7, 2, 9]);
        assert_eq!(shard(&order, 3, 4), vec![1, 6, 3]);
        assert_eq!(shard(&order, 0, 1), order);
        // Fewer indices than ranks: the order repeats.
        assert_eq!(shard(&[5, 6], 2, 3), vec![5]);
        let all: Vec<i64> = (0..3).flat_map(|r| eval_shard(10, r, 3)).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<i64>>(), "each test image exactly once");
        assert_eq!(eval_shard(10, 1, 3), vec![1, 4, 7]);
    }
}
