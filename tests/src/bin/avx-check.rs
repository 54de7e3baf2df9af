//! Checks that AVX register state survives preemption: holds a value in YMM1 across a
//! long busy loop (long enough for the scheduler to run other processes) and compares the
//! whole register afterwards. Prints `avx-check: unavailable ...` when the OS does not
//! enable AVX state for user space, else `avx-check: corrupted lanes N`.

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::arch::x86_64::{__cpuid, _xgetbv};
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        println!("avx-check: unavailable (OSXSAVE off)");
        return;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is allowed.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & 0b110 != 0b110 {
        println!("avx-check: unavailable (XCR0 {xcr0:#x})");
        return;
    }
    let seed: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let mut bad = 0;
    for round in 0..30u64 {
        let v = seed * 1_000_000 + round;
        let mut out = [0u64; 4];
        // SAFETY: XCR0 enables YMM state (checked above); the asm only touches ymm1, rcx
        // and `out`.
        unsafe { hold_ymm(v, &mut out) };
        bad += out.iter().filter(|&&x| x != v).count();
    }
    println!("avx-check: corrupted lanes {bad}");

    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        // SAFETY: the caller checked OSXSAVE.
        unsafe { _xgetbv(0) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hold_ymm(v: u64, out: &mut [u64; 4]) {
    // SAFETY: see the caller.
    unsafe {
        std::arch::asm!(
            "vpbroadcastq ymm1, qword ptr [{v}]",
            "mov rcx, 30000000",
            "2:",
            "dec rcx",
            "jnz 2b",
            "vmovdqu ymmword ptr [{out}], ymm1",
            v = in(reg) &v,
            out = in(reg) out.as_mut_ptr(),
            out("rcx") _,
            out("ymm1") _,
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("avx-check: unavailable (not x86_64)");
}
