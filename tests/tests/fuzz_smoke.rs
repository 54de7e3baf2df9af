//! The fuzz targets' entry points on stable, in every `make test`: each one runs on its
//! kept inputs (`fuzz/seeds/<target>/`, and `fuzz/regressions/<target>/` where a crash
//! found by `make fuzz` is kept once fixed) and on a few hundred deterministic mutations
//! of them. A panic here is a bug a guest, a peer or a config.json could trigger.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn kept_inputs(target: &str) -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            inputs.push(std::fs::read(e.path()).unwrap());
        }
    }
    inputs
}

/// xorshift64: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A copy of `input` with a few bytes flipped, cut or repeated.
    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(4) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 if !v.is_empty() => v.truncate(self.below(v.len())),
                2 if !v.is_empty() => {
                    let i = self.below(v.len());
                    let byte = v[i];
                    v.insert(i, byte);
                }
                _ => v.push(self.next() as u8),
            }
        }
        v
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn smoke(target: &str, run: fn(&[u8]), mutations: usize, random_len: usize) {
    let kept = kept_inputs(target);
    assert!(
        !kept.is_empty(),
        "no seeds for {target} in {}",
        fuzz_dir().display()
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for input in &kept {
        run(input);
    }
    for i in 0..mutations {
        let input = rng.mutate(&kept[i % kept.len()]);
        run(&input);
    }
    for _ in 0..mutations / 4 {
        let len = rng.below(random_len);
        let input = rng.bytes(len);
        run(&input);
    }
}

#[test]
fn frames() {
    smoke("frames", agent_protocol::fuzzing::frames, 2000, 512);
}

#[test]
fn translate() {
    smoke("translate", runtime_cli::fuzzing::translate, 400, 512);
    runtime_cli::fuzzing::remove_scratch();
}

/// Both device harnesses in one test: they share the VMM's scratch directories.
#[test]
fn mmio_vsock_and_fs() {
    smoke("mmio_vsock", vmm::fuzzing::mmio_vsock, 200, 80 << 10);
    smoke("mmio_fs", vmm::fuzzing::mmio_fs, 200, 80 << 10);
    vmm::fuzzing::remove_scratch();
}
