//! Data-parallel training: the workers of one run and how they combine numbers.
//!
//! Each worker (an MPI rank, or a device in this process) holds a replica of the model and of
//! its optimizer and takes its slice of the same shuffled global batch. Before each update
//! the workers sum their gradients, loss sums and counts
//! ([`crate::train::step::Accumulated::all_reduce`]), so
//! every replica applies the same update to the same weights and they stay equal. Worker 0
//! alone writes checkpoints, metrics and progress; the others wait for it at a barrier.
//!
//! Burn 0.22's own `all_reduce` works only between CUDA devices of one process (NCCL), so
//! the sum is taken on the host, which every backend can reach: MPI (feature `mpi`) across
//! processes and machines, [`InProcess`] between devices of one process. Between CUDA
//! devices of one process (feature `cuda`) the gradients go through Burn's NCCL all-reduce
//! instead ([`Collective::nccl_devices`]); the counts and the rest still go through the host.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The workers of one run. Every worker calls the same collective operations in the same
/// order; a worker that stops makes the others' next call fail instead of hang.
pub trait Collective: Send + Sync {
    /// This worker's index, 0 to `world_size - 1`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `values` on every worker by their elementwise sum over all workers (the same
    /// bits on every worker).
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] of `f32` values (gradients): summed in `f64`, rounded
    /// once.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let mut wide: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        self.all_reduce_sum(&mut wide)?;
        for (v, w) in values.iter_mut().zip(wide) {
            *v = w as f32;
        }
        Ok(())
    }
    /// Every worker's `mine`, in rank order, on every worker (what [`map_shared`] gathers).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every worker has reached this point.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [])
    }
    /// How the workers are connected, for the start-up line.
    fn describe(&self) -> String;

    /// The CUDA devices of an in-process group whose gradients Burn all-reduces on the
    /// devices through NCCL (every worker's, in rank order); `None`: gradients are summed
    /// on the host.
    fn nccl_devices(&self) -> Option<&[burn::tensor::Device]> {
        None
    }

    /// Whether this worker writes the run's files and prints its progress (worker 0).
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// Prints `line` to stderr once for the run: on worker 0.
    fn say(&self, line: &str) {
        if self.is_writer() {
            eprintln!("{line}");
        }
    }

    /// Whether any worker says `yes` (a Ctrl-C seen by one rank stops all at the same step).
    fn any(&self, yes: bool) -> Result<bool> {
        let mut flag = [if yes { 1.0 } else { 0.0 }];
        self.all_reduce_sum(&mut flag)?;
        Ok(flag[0] > 0.0)
    }
}

/// Items `0..n` computed by the workers in turn (worker `r` takes `r`, `r + N`, ...) and
/// gathered: every worker returns all `n` in order. Each item must not depend on which worker
/// made it (a generation batch with its own seed, a no-grad pass over some rows), so the
/// result is the same for any number of workers.
pub fn map_shared<T: Serialize + DeserializeOwned>(
    collective: &dyn Collective,
    n: usize,
    mut item: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<T>> {
    let (rank, world) = (collective.rank(), collective.world_size());
    if world == 1 {
        return (0..n).map(item).collect();
    }
    let mine = (rank..n)
        .step_by(world)
        .map(&mut item)
        .collect::<Result<Vec<T>>>()?;
    let mut parts = Vec::with_capacity(world);
    for bytes in collective.all_gather_bytes(&serde_json::to_vec(&mine)?)? {
        parts.push(serde_json::from_slice::<Vec<T>>(&bytes)?.into_iter());
    }
    (0..n)
        .map(|i| {
            parts[i % world]
                .next()
                .ok_or_else(|| anyhow::anyhow!("worker {} sent too few items", i % world))
        })
        .collect()
}

/// Worker `rank`'s part of a global batch split among `world` workers: a contiguous slice,
/// the sizes differing by at most one. The loss is normalised by the count over all workers,
/// so an uneven split changes nothing.
pub fn share<T>(global: &[T], rank: usize, world: usize) -> &[T] {
    &global[share_range(global.len(), rank, world)]
}

/// The positions of worker `rank`'s part (see [`share`]) of `n` items.
pub fn share_range(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

/// How a worker's error says that it stopped because another one did.
pub const STOPPED: &str = "stopped, so the others stop too";

/// One worker: nothing to combine.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn describe(&self) -> String {
        "one worker".into()
    }
}

/// The workers of one process (one thread and device each), summing through host memory:
/// wgpu has no transport between devices, and this works for every backend.
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    /// Every worker's device when all are CUDA devices (feature `cuda`): gradients go through
    /// NCCL.
    nccl: Option<Arc<Vec<burn::tensor::Device>>>,
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
    /// Each worker's part of the current all-gather.
    gathered: Mutex<Vec<Vec<u8>>>,
}

/// One all-reduce in progress: each worker deposits its values, the last one to arrive sums
/// them in rank order, and every worker copies the sum out before the next round starts.
#[derive(Default)]
struct Round {
    deposited: Vec<Option<Vec<f64>>>,
    arrived: usize,
    sum: Vec<f64>,
    /// Workers still to copy `sum` out; a new round waits until this is 0.
    readers_left: usize,
    generation: u64,
    /// A worker that stopped (finished, failed or panicked), if any.
    stopped: Option<usize>,
}

impl InProcess {
    /// `world` connected workers, in rank order.
    pub fn group(world: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round {
                deposited: vec![None; world],
                ..Round::default()
            }),
            changed: Condvar::new(),
            gathered: Mutex::new(vec![Vec::new(); world]),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
                nccl: None,
            })
            .collect()
    }

    /// One worker per device, in order. When every device is a CUDA device (a build with
    /// `cuda`), gradients are all-reduced on the devices through NCCL; otherwise on the host.
    pub fn group_on(devices: &[crate::device::ComputeDevice]) -> Vec<InProcess> {
        let nccl = (cfg!(feature = "cuda") && devices.iter().all(|d| d.backend == "cuda"))
            .then(|| Arc::new(devices.iter().map(|d| d.device.clone()).collect::<Vec<_>>()));
        let mut group = Self::group(devices.len());
        for worker in &mut group {
            worker.nccl = nccl.clone();
        }
        group
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let shared = &*self.shared;
        let stopped = |round: &Round| -> Result<()> {
            match round.stopped {
                Some(rank) => bail!("worker {rank} {STOPPED}"),
                None => Ok(()),
            }
        };
        let mut round = shared
            .round
            .lock()
            .expect("no worker panics holding the lock");
        // The previous round's sum must be read by everyone before it is replaced.
        while round.readers_left > 0 {
            stopped(&round)?;
            round = shared.changed.wait(round).expect("lock");
        }
        stopped(&round)?;
        round.deposited[self.rank] = Some(values.to_vec());
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == shared.world {
            let mut sum = vec![0.0; values.len()];
            for deposited in round.deposited.iter_mut() {
                let part = deposited.take().expect("every worker deposited");
                if part.len() != sum.len() {
                    bail!(
                        "workers all-reduced {} and {} values: their models differ",
                        part.len(),
                        sum.len()
                    );
                }
                for (s, p) in sum.iter_mut().zip(part) {
                    *s += p;
                }
            }
            round.sum = sum;
            round.arrived = 0;
            round.readers_left = shared.world;
            round.generation += 1;
            shared.changed.notify_all();
        } else {
            while round.generation == generation {
                stopped(&round)?;
                round = shared.changed.wait(round).expect("lock");
            }
        }
        values.copy_from_slice(&round.sum);
        round.readers_left -= 1;
        if round.readers_left == 0 {
            round.sum = Vec::new();
            shared.changed.notify_all();
        }
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.shared.gathered.lock().expect("lock")[self.rank] = mine.to_vec();
        // After the first barrier every part is in; after the second every worker has its
        // copy, so the next all-gather may overwrite the parts.
        self.barrier()?;
        let all = self.shared.gathered.lock().expect("lock").clone();
        self.barrier()?;
        Ok(all)
    }

    fn describe(&self) -> String {
        match self.nccl {
            Some(_) => format!(
                "{} CUDA devices in this process, gradients summed by NCCL",
                self.shared.world
            ),
            None => format!(
                "{} devices in this process, summed on the host",
                self.shared.world
            ),
        }
    }

    fn nccl_devices(&self) -> Option<&[burn::tensor::Device]> {
        self.nccl.as_deref().map(Vec::as_slice)
    }
}

impl Drop for InProcess {
    /// A worker that goes away (done, failed or panicking) releases the others' waits: after
    /// the last step nobody waits any more, and during a run they stop with an error.
    fn drop(&mut self) {
        if let Ok(mut round) = self.shared.round.lock() {
            round.stopped.get_or_insert(self.rank);
            self.shared.changed.notify_all();
        }
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::Mpi;

#[cfg(feature = "mpi")]
mod mpi_world {
    use std::sync::Mutex;

    use anyhow::{Result, anyhow};
    use mpi::Count;
    use mpi::collective::SystemOperation;
    use mpi::datatype::{Equivalence, PartitionMut};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::Collective;

    /// The ranks of an `mpirun` job (feature `mpi`), over MPI's own transport (shared memory
    /// on one machine, TCP or InfiniBand between machines).
    pub struct Mpi {
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        _universe: mpi::environment::Universe,
    }

    // MPI is initialised with `Threading::Serialized` and every call goes through the
    // mutex, so the communicator is never used by two threads at once.
    unsafe impl Send for Mpi {}
    unsafe impl Sync for Mpi {}

    impl Mpi {
        /// MPI's elementwise sum over the ranks (its own reduction order, the same on every
        /// rank).
        fn sum_in_place<T: Equivalence + Clone>(&self, values: &mut [T]) {
            let send = values.to_vec();
            let world = self.world.lock().expect("lock");
            world.all_reduce_into(&send[..], values, SystemOperation::sum());
        }

        /// Joins the job when this process was started by `mpirun` (or another MPI
        /// launcher) with more than one rank; `None` otherwise.
        pub fn join() -> Result<Option<Mpi>> {
            if super::launcher_world_size().unwrap_or(1) <= 1 {
                return Ok(None);
            }
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| anyhow!("MPI was already initialised"))?;
            let world = universe.world();
            Ok(Some(Mpi {
                rank: world.rank() as usize,
                size: world.size() as usize,
                world: Mutex::new(world),
                _universe: universe,
            }))
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
            if values.is_empty() {
                self.world.lock().expect("lock").barrier();
                return Ok(());
            }
            self.sum_in_place(values);
            Ok(())
        }
        fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
            self.sum_in_place(values);
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            let world = self.world.lock().expect("lock");
            let count = Count::try_from(mine.len())
                .map_err(|_| anyhow!("cannot all-gather {} bytes at once", mine.len()))?;
            let mut counts = vec![0 as Count; self.size];
            world.all_gather_into(&count, &mut counts[..]);
            let displs: Vec<Count> = counts
                .iter()
                .scan(0, |offset, &n| {
                    let at = *offset;
                    *offset += n;
                    Some(at)
                })
                .collect();
            let total: usize = counts.iter().map(|&n| n as usize).sum();
            let mut all = vec![0u8; total];
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            world.all_gather_varcount_into(mine, &mut parts);
            Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&n, &at)| all[at as usize..(at + n) as usize].to_vec())
                .collect())
        }
        fn describe(&self) -> String {
            let version = mpi::environment::library_version().unwrap_or_default();
            // "Open MPI v4.1.4, package: ..." is shortened to its first part.
            let library = version
                .split([',', '\n'])
                .next()
                .unwrap_or("MPI")
                .trim()
                .to_string();
            format!("{} MPI ranks ({library})", self.size)
        }
    }
}

/// This process's place in an MPI job (`mpirun -n N kiln ...`), or [`Solo`] when it was not
/// started by an MPI launcher. A build without the `mpi` feature started as one of several
/// ranks is an error: otherwise each rank would train alone and all would write one run.
pub fn from_launcher() -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if let Some(mpi) = Mpi::join()? {
        return Ok(Arc::new(mpi));
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launcher_world_size().filter(|&n| n > 1) {
        bail!(
            "started as one of {n} MPI ranks, but this kiln was built without MPI: build it with `cargo build --release --features mpi` (docs/distributed.md)"
        );
    }
    Ok(Arc::new(Solo))
}

/// This process's rank among the ranks of its machine, as an MPI launcher says (Open MPI,
/// MPICH, Slurm); 0 outside a launcher.
pub fn launcher_local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The number of ranks an MPI launcher says this process belongs to (Open MPI, MPICH and
/// Slurm's PMI each set their own variable).
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_once_in_order() {
        let global: Vec<usize> = (0..7).collect();
        for world in 1..=7 {
            let parts: Vec<&[usize]> = (0..world).map(|r| share(&global, r, world)).collect();
            assert_eq!(parts.concat(), global, "world {world}");
            let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn in_process_sums_in_rank_order_on_every_worker() {
        let world = 3;
        let results: Vec<Vec<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = InProcess::group(world)
                .into_iter()
                .map(|worker| {
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..50 {
                            let r = worker.rank() as f64;
                            let mut values = vec![r + round as f64, 10.0 * r, 1.0];
                            worker.all_reduce_sum(&mut values).unwrap();
                            out.extend(values);
                            worker.barrier().unwrap();
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (round, chunk) in results[0].chunks(3).enumerate() {
            assert_eq!(
                chunk,
                [3.0 * round as f64 + 3.0, 30.0, 3.0],
                "round {round}"
            );
        }
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn in_process_all_gather_gives_every_part_in_rank_order() {
        let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = InProcess::group(3)
                .into_iter()
                .map(|worker| {
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..20u8 {
                            let part = vec![worker.rank() as u8 + round; worker.rank() + 1];
                            out.extend(worker.all_gather_bytes(&part).unwrap());
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, part) in results[0].iter().enumerate() {
            let (round, rank) = ((i / 3) as u8, i % 3);
            assert_eq!(part, &vec![rank as u8 + round; rank + 1]);
        }
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn only_a_group_of_cuda_devices_sums_gradients_through_nccl() {
        // CPU devices (or a mixed group) sum on the host; a CUDA-only group does so through
        // NCCL, which needs the `cuda` feature and is not run here (no GPU in CI).
        let cpu = crate::device::ComputeDevice::cpu();
        let group = InProcess::group_on(&[cpu.clone(), cpu.clone()]);
        assert_eq!(group.len(), 2);
        assert!(group.iter().all(|w| w.nccl_devices().is_none()));
        assert!(group[0].describe().contains("summed on the host"));
        let cuda = crate::device::ComputeDevice {
            backend: "cuda",
            ..cpu.clone()
        };
        let mixed = InProcess::group_on(&[cuda.clone(), cpu]);
        assert!(mixed[1].nccl_devices().is_none());
        let all_cuda = InProcess::group_on(&[cuda.clone(), cuda]);
        assert_eq!(
            all_cuda[1].nccl_devices().map(<[_]>::len),
            cfg!(feature = "cuda").then_some(2)
        );
    }

    #[test]
    fn map_shared_gives_every_item_in_order_for_any_number_of_workers() {
        for world in 1..=4 {
            let results: Vec<Vec<(usize, f64)>> = std::thread::scope(|scope| {
                let handles: Vec<_> = InProcess::group(world)
                    .into_iter()
                    .map(|worker| {
                        scope.spawn(move || {
                            map_shared(&worker, 7, |i| Ok((worker.rank(), 1.0 / (i as f64 + 3.0))))
                                .unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for got in &results {
                let expected: Vec<(usize, f64)> = (0..7)
                    .map(|i| (i % world, 1.0 / (i as f64 + 3.0)))
                    .collect();
                assert_eq!(got, &expected, "{world} workers");
            }
        }
    }

    #[test]
    fn a_stopped_worker_releases_the_others() {
        let mut group = InProcess::group(2);
        let survivor = group.remove(0);
        let waiting = std::thread::spawn(move || survivor.all_reduce_sum(&mut [1.0]));
        drop(group); // worker 1 leaves without joining the all-reduce
        let error = waiting.join().unwrap().unwrap_err().to_string();
        assert!(error.contains("worker 1 stopped"), "{error}");
    }
}
