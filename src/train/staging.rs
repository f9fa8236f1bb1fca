//! `--data-on host`: a dataset kept in host memory (a read image cache memory-mapped), batch by
//! batch. Each batch is gathered on the host into one of two buffers (pinned when the device is
//! CUDA), copied from there into that buffer's twin on the device, and from the twin into one input
//! buffer kept for the whole run, so that a recorded CUDA graph finds its input in place; the step
//! then gathers `0..n` of that buffer where it would have gathered the batch's indices from the set.
//!
//! The next batch is staged while the device runs this one ([`prefetch`], called once a step is
//! queued): on CUDA its host-to-device copy runs on a side stream, after the step that last read its
//! twin and beside the step now running; the step that needs it waits for it on the device, not the
//! host. The host waits only before refilling a pinned buffer whose last copy is still queued. A
//! batch is always taken from the buffer that holds its own indices, staged there and then if
//! none does, so what a step reads never depends on a guess of what comes next.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::config::DataOn;
use crate::data::Dataset;
use crate::native::{self, CudaEvent};

/// One of the two paths a batch takes: a host buffer and its twin on the device.
struct Slot {
    /// Pinned when the device is CUDA, so that the copy is a DMA the host need not wait for.
    host: Tensor,
    device: Tensor,
    /// The host index of the batch whose copy into `device` is queued and not yet taken.
    holds: Option<Tensor>,
    /// On CUDA, when the shim has it: recorded after the last copy into `device`, and after
    /// `device` was last read.
    events: Option<SlotEvents>,
}

struct SlotEvents {
    copied: CudaEvent,
    read: CudaEvent,
}

/// The device buffers a split's batches are copied into.
pub(crate) struct Staging {
    slots: [Slot; 2],
    /// The slot the next batch is staged through: not the one the last batch was taken from.
    next: usize,
    images: Tensor,
    labels: Tensor,
    /// `0..batch` on the device: the index a staged batch is gathered with.
    arange: Tensor,
}

impl Staging {
    /// Buffers for batches of up to `batch` images like those of `host_images`, on `device`.
    fn new(host_images: &Tensor, batch: i64, device: Device) -> Staging {
        let mut shape = host_images.size();
        shape[0] = batch;
        let kind = host_images.kind();
        let pair = |index| -> Result<[SlotEvents; 2]> {
            let events = || -> Result<SlotEvents> {
                Ok(SlotEvents { copied: CudaEvent::new(index)?, read: CudaEvent::new(index)? })
            };
            Ok([events()?, events()?])
        };
        let events = match device {
            // Without events (a build without the CUDA shim) each copy waits for the device, as a
            // plain copy from pinned memory does: slower, never wrong.
            Device::Cuda(index) => pair(index).map(|p| p.map(Some)).unwrap_or_else(|err| {
                eprintln!("warning: {err:#}; each batch's copy to the device waits for it");
                [None, None]
            }),
            _ => [None, None],
        };
        let slots = events.map(|events| {
            let host = Tensor::empty(&shape, (kind, Device::Cpu));
            let host = if device.is_cuda() { host.pin_memory(device) } else { host };
            Slot { host, device: Tensor::empty(&shape, (kind, device)), holds: None, events }
        });
        Staging {
            slots,
            next: 0,
            images: Tensor::empty(&shape, (kind, device)),
            labels: Tensor::empty([batch], (Kind::Int64, device)),
            arange: Tensor::arange(batch, (Kind::Int64, device)),
        }
    }

    /// Gathers the host images at `host_index` into slot `s` and queues their copy to its device
    /// buffer (on CUDA after the step that last read that buffer, without waiting on the host).
    fn fill(&mut self, s: usize, host_images: &Tensor, host_index: &Tensor) -> Result<()> {
        let slot = &mut self.slots[s];
        if let Some(events) = &slot.events {
            // The pinned buffer is rewritten only once its last copy is done.
            events.copied.synchronize()?;
        }
        let n = host_index.size()[0];
        let host = slot.host.narrow(0, 0, n);
        let _ = host_images.index_select_out(&host, 0, host_index);
        let device = slot.device.narrow(0, 0, n);
        match &slot.events {
            Some(events) => native::copy_on_side_stream(&device, &host, &events.read, &events.copied)?,
            None => {
                device.shallow_clone().copy_(&host);
            }
        }
        slot.holds = Some(host_index.shallow_clone());
        Ok(())
    }

    /// The batch of host images at `host_index` (on the CPU) with the labels at `index` (on the
    /// device), staged: (images, labels, index) to train or evaluate on, as if the set were on the device.
    fn batch(
        &mut self,
        host_images: &Tensor,
        labels: &Tensor,
        host_index: &Tensor,
        index: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let held =
            |slot: &Slot| slot.holds.as_ref().is_some_and(|h| h.size() == host_index.size() && h.equal(host_index));
        let s = match self.slots.iter().position(held) {
            Some(s) => s,
            None => {
                self.fill(self.next, host_images, host_index)?;
                self.next
            }
        };
        self.next = 1 - s;
        let n = host_index.size()[0];
        let slot = &mut self.slots[s];
        slot.holds = None;
        if let Some(events) = &slot.events {
            events.copied.wait_on_current_stream()?;
        }
        let images = self.images.narrow(0, 0, n);
        images.shallow_clone().copy_(&slot.device.narrow(0, 0, n));
        if let Some(events) = &slot.events {
            events.read.record()?;
        }
        let staged_labels = self.labels.narrow(0, 0, n);
        staged_labels.shallow_clone().copy_(&labels.index_select(0, index));
        Ok([images, staged_labels, self.arange.narrow(0, 0, n)])
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // A copy still queued writes into a device buffer about to go back to the allocator.
        for events in self.slots.iter().filter_map(|slot| slot.events.as_ref()) {
            let _ = events.copied.synchronize();
        }
    }
}

/// The (images, labels, index) a step at `index` reads: the set's own tensors when its images are on
/// the device; else the batch at `host_index` (made only then) staged into `slot`'s buffers, made
/// on first use for batches of up to `batch` images.
pub(crate) fn step_input(
    slot: &mut Option<Staging>,
    on_host: bool,
    (images, labels): (&Tensor, &Tensor),
    index: Tensor,
    host_index: impl FnOnce() -> Tensor,
    batch: i64,
) -> Result<[Tensor; 3]> {
    if !on_host {
        return Ok([images.shallow_clone(), labels.shallow_clone(), index]);
    }
    let staging = slot.get_or_insert_with(|| Staging::new(images, batch, labels.device()));
    staging.batch(images, labels, &host_index(), &index)
}

/// Stages the batch at `host_index` (made only when the set is on the host) while the step just
/// queued runs, for the [`step_input`] that asks for it next.
pub(crate) fn prefetch(slot: &mut Option<Staging>, images: &Tensor, host_index: impl FnOnce() -> Tensor) -> Result<()> {
    match slot {
        Some(staging) => {
            let s = staging.next;
            staging.fill(s, images, &host_index())
        }
        None => Ok(()),
    }
}

/// Puts `data` where `--data-on` says for training on `device`: returns it with a line saying so
/// when its images stay in host memory.
pub fn place(data: Dataset, device: Device, data_on: DataOn) -> (Dataset, Option<String>) {
    let memory = match device {
        Device::Cuda(index) => native::cuda_memory(index),
        _ => None,
    };
    let bytes = data.image_bytes();
    let on_host = data_on.on_host(bytes, memory);
    let line = on_host.then(|| {
        let why = match (data_on, memory) {
            (DataOn::Auto, Some((free, _))) => {
                format!("more than {:.0}% of the device's {:.1} GB free", DataOn::AUTO_SHARE * 100.0, free as f64 / 1e9)
            }
            _ => "--data-on host".to_string(),
        };
        format!(
            "data: {} MB of images kept in host memory ({why}); each batch is copied to the device",
            bytes.div_ceil(1 << 20)
        )
    });
    (data.to_device(device, on_host), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(batch: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(batch.flatten(1, -1).select(1, 0)).expect("int64")
    }

    #[test]
    fn a_prefetched_batch_is_the_one_taken_and_any_other_is_staged_when_asked_for() {
        // Image i is filled with i, so a batch says which images it holds.
        let images = Tensor::arange(10, (Kind::Int64, Device::Cpu)).view([10, 1, 1, 1]).repeat([1, 3, 2, 2]);
        let labels = Tensor::arange(10, (Kind::Int64, Device::Cpu)) * 100;
        let mut slot = None;
        let first = Tensor::from_slice(&[3i64, 1, 4]);
        let [x, y, index] =
            step_input(&mut slot, true, (&images, &labels), first.shallow_clone(), || first.shallow_clone(), 4)
                .expect("staged");
        assert_eq!(
            (ids(&x.index_select(0, &index)), Vec::<i64>::try_from(&y).unwrap()),
            (vec![3, 1, 4], vec![300, 100, 400])
        );

        // Staged ahead, then the set changes: the step still reads what was staged, a copy made
        // before the change (as a device copy queued ahead would be).
        let next = Tensor::from_slice(&[5i64, 9]);
        prefetch(&mut slot, &images, || next.shallow_clone()).expect("prefetched");
        let _ = images.shallow_clone().get(5).fill_(-5);
        let [x, y, _] =
            step_input(&mut slot, true, (&images, &labels), next.shallow_clone(), || next.shallow_clone(), 4)
                .expect("staged");
        assert_eq!((ids(&x), Vec::<i64>::try_from(&y).unwrap()), (vec![5, 9], vec![500, 900]));

        // A batch other than the one staged ahead is staged when asked for, from the set as it is now.
        prefetch(&mut slot, &images, || Tensor::from_slice(&[0i64])).expect("prefetched");
        let asked = Tensor::from_slice(&[5i64, 2, 7, 8]);
        let [x, _, _] =
            step_input(&mut slot, true, (&images, &labels), asked.shallow_clone(), || asked.shallow_clone(), 4)
                .expect("staged");
        assert_eq!(ids(&x), vec![-5, 2, 7, 8]);
    }
}
