//! Whether the target's CPU can run what the source's CPU runs. A process picks its code
//! paths once, at start (glibc's ifuncs, a JIT, a database's checksum routine), from the
//! CPU it started on; restored on a CPU without one of those instructions it dies of
//! SIGILL (exit 132) at the first use, after a migration that looked fine.
//!
//! CRIU does not catch this for podman: its default `--cpu-cap` (fpu, ins) has no
//! `image`, so a checkpoint carries no `cpuinfo.img` and the restore checks nothing.
//! `criu cpuinfo check` could, but says only "CPU instruction capabilities do not match
//! run time", without naming what is missing. So migrate compares the CPU flags the
//! kernel reports (`/proc/cpuinfo`), restricted on x86 to the instruction sets a user
//! process can execute: CRIU's instruction mask (`criu/arch/x86/cpu.c`) without its
//! privileged and kernel-internal bits, plus the extensions that came after it. Flags
//! that only describe the machine (`hypervisor`, `constant_tsc`, mitigations …) differ
//! between any two hosts and are not compared.

use std::collections::BTreeSet;

use crate::engine::stack::{Facts, Finding, Level, Side};

/// x86 instruction-set features (as `/proc/cpuinfo` names them) that a process may use
/// once it has seen them at start.
const X86_INSTRUCTION_SETS: &[&str] = &[
    // CRIU's instruction mask, without `monitor` (MWAIT is privileged) and `rep_good`,
    // `erms` (hints for how to copy memory, not instructions).
    "fpu",
    "tsc",
    "cx8",
    "sep",
    "cmov",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "syscall",
    "mmxext",
    "rdtscp",
    "3dnowext",
    "3dnow",
    "nopl",
    "pni",
    "pclmulqdq",
    "ssse3",
    "cx16",
    "sse4_1",
    "sse4_2",
    "movbe",
    "popcnt",
    "aes",
    "xsave",
    "avx",
    "f16c",
    "rdrand",
    "abm",
    "sse4a",
    "misalignsse",
    "3dnowprefetch",
    "xop",
    "fma4",
    "tbm",
    "fsgsbase",
    "bmi1",
    "hle",
    "avx2",
    "bmi2",
    "rtm",
    "mpx",
    "avx512f",
    "avx512dq",
    "rdseed",
    "adx",
    "clflushopt",
    "avx512pf",
    "avx512er",
    "avx512cd",
    "sha_ni",
    "avx512bw",
    "avx512vl",
    "xsaveopt",
    "xsavec",
    "xgetbv1",
    "xsaves",
    // Not in CRIU's mask, but instructions all the same.
    "fma",
    "lahf_lm",
    "clwb",
    "clzero",
    "rdpid",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_4vnniw",
    "avx512_4fmaps",
    "avx512_bf16",
    "avx512_vp2intersect",
    "avx512_fp16",
    "avx_vnni",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "movdiri",
    "movdir64b",
    "serialize",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
];

/// The features `source` has and `target` lacks, in the source's order. On x86 only
/// instruction sets count; elsewhere (arm64's `Features` are all user-visible) every flag
/// does.
pub fn missing_features(arch: &str, source: &str, target: &str) -> Vec<String> {
    let there: BTreeSet<&str> = target.split_whitespace().collect();
    let x86 = matches!(arch, "x86_64" | "i686" | "i386");
    let mut seen = BTreeSet::new();
    source
        .split_whitespace()
        .filter(|f| !x86 || X86_INSTRUCTION_SETS.contains(f))
        .filter(|f| !there.contains(f) && seen.insert(*f))
        .map(str::to_string)
        .collect()
}

/// The CPU finding for a move from `source` to `target`. `ignore`: `--ignore-cpu`, which
/// turns missing features into a warning (a different architecture stays a failure:
/// nothing of the source runs there).
pub fn cpu_finding(source: &Facts, target: &Facts, ignore: bool) -> Finding {
    let model = |f: &Facts| f.cpu_model.clone().unwrap_or_else(|| "unknown".into());
    let (Some(src_arch), Some(dst_arch)) = (&source.cpu_arch, &target.cpu_arch) else {
        return Finding::new(
            Level::Warn,
            Side::Target,
            "cpu_unknown",
            "cannot compare the CPUs: a host did not say what it runs on",
        );
    };
    if src_arch != dst_arch {
        return Finding::new(
            Level::Fail,
            Side::Target,
            "cpu_arch_differs",
            format!("the target is {dst_arch}, the source {src_arch}: a checkpoint restores only on the same architecture"),
        )
        .fix("move to a host of the same architecture");
    }
    let (Some(src), Some(dst)) = (&source.cpu_flags, &target.cpu_flags) else {
        return Finding::new(
            Level::Warn,
            Side::Target,
            "cpu_unknown",
            "cannot compare the CPUs: /proc/cpuinfo lists no flags on a host",
        );
    };
    let missing = missing_features(src_arch, src, dst);
    if missing.is_empty() {
        return Finding::new(
            Level::Ok,
            Side::Target,
            "cpu_compatible",
            format!(
                "the target's CPU ({}) has every instruction set of the source's ({})",
                model(target),
                model(source)
            ),
        );
    }
    let text = format!(
        "the target's CPU ({}) lacks {} of the source's ({}): {}; a restored process that uses one dies of SIGILL (exit 132)",
        model(target),
        if missing.len() == 1 {
            "an instruction set".to_string()
        } else {
            format!("{} instruction sets", missing.len())
        },
        model(source),
        missing.join(" ")
    );
    if ignore {
        Finding::new(
            Level::Warn,
            Side::Target,
            "cpu_missing_features",
            format!("{text}; moving anyway (--ignore-cpu)"),
        )
    } else {
        Finding::new(Level::Fail, Side::Target, "cpu_missing_features", text).fix(
            "move to a host whose CPU has them (or restrict both hosts' VMs to a common CPU model); pass --ignore-cpu only when you know the containers' programs do not use them",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first processor of a real AWS m4 host (Broadwell, no AVX-512, with TSX).
    const BROADWELL: &str = "processor\t: 31
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 79
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
stepping\t: 1
microcode\t: 0xb00001b
cpu MHz\t\t: 1391.769
cache size\t: 46080 KB
fpu\t\t: yes
fpu_exception\t: yes
cpuid level\t: 13
wp\t\t: yes
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc aperfmperf eagerfpu pni pclmulqdq monitor est ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm rdseed adx xsaveopt ida
bugs\t\t:
bogomips\t: 4600.08
";

    /// The first processor of the lab's hosts (an AMD EPYC VM with AVX-512, no TSX).
    const EPYC: &str = "processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass
";

    /// What the probe prints for a host whose `/proc/cpuinfo` is `cpuinfo`: the probe's
    /// own script, run on a copy of it.
    fn probed(cpuinfo: &str, arch: &str) -> Facts {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpuinfo");
        std::fs::write(&path, cpuinfo).unwrap();
        let script = crate::engine::stack::CPU_SCRIPT
            .replace("/proc/cpuinfo", path.to_str().unwrap())
            .replace("$(uname -m)", arch);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Facts::parse(&String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn the_probe_reads_model_and_flags() {
        let f = probed(BROADWELL, "x86_64");
        assert_eq!(f.cpu_arch.as_deref(), Some("x86_64"));
        assert_eq!(
            f.cpu_model.as_deref(),
            Some("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz")
        );
        let flags = f.cpu_flags.unwrap();
        assert!(flags.starts_with("fpu vme de ") && flags.ends_with(" xsaveopt ida"));
    }

    #[test]
    fn a_newer_cpu_to_an_older_one_names_what_is_missing() {
        let epyc = probed(EPYC, "x86_64");
        let broadwell = probed(BROADWELL, "x86_64");
        let f = cpu_finding(&epyc, &broadwell, false);
        assert_eq!((f.level, f.code), (Level::Fail, "cpu_missing_features"));
        let missing = missing_features(
            "x86_64",
            epyc.cpu_flags.as_deref().unwrap(),
            broadwell.cpu_flags.as_deref().unwrap(),
        );
        assert_eq!(
            missing.join(" "),
            "mmxext sse4a misalignsse avx512f avx512dq avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsavec xgetbv1 xsaves avx512_bf16 clzero avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid"
        );
        assert!(f.text.contains("lacks 26 instruction sets"), "{}", f.text);
        assert!(f.text.contains(": mmxext sse4a "), "{}", f.text);
        assert!(f.text.contains("(AMD EPYC)"), "{}", f.text);
        assert!(f.fix.as_deref().unwrap().contains("--ignore-cpu"));
        // Machine flags (hypervisor, fxsr_opt, umip, arat …) are not instruction sets.
        assert!(
            !missing
                .iter()
                .any(|m| ["fxsr_opt", "umip", "arat", "fsrm"].contains(&m.as_str()))
        );
    }

    #[test]
    fn an_older_cpu_to_a_newer_one_can_lack_something_too() {
        // Broadwell has TSX (hle, rtm), which AMD never had.
        let f = cpu_finding(&probed(BROADWELL, "x86_64"), &probed(EPYC, "x86_64"), false);
        assert_eq!(f.level, Level::Fail);
        assert_eq!(
            f.text,
            "the target's CPU (AMD EPYC) lacks 2 instruction sets of the source's (Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz): hle rtm; a restored process that uses one dies of SIGILL (exit 132)"
        );
        // `monitor` (privileged) and `erms` (a hint) do not count although EPYC lacks monitor.
        assert!(!f.text.contains("monitor"), "{}", f.text);
    }

    #[test]
    fn the_same_cpu_is_compatible_and_the_override_only_warns() {
        let epyc = probed(EPYC, "x86_64");
        let f = cpu_finding(&epyc, &epyc, false);
        assert_eq!((f.level, f.code), (Level::Ok, "cpu_compatible"));
        let f = cpu_finding(&epyc, &probed(BROADWELL, "x86_64"), true);
        assert_eq!((f.level, f.code), (Level::Warn, "cpu_missing_features"));
        assert!(
            f.text.ends_with("moving anyway (--ignore-cpu)"),
            "{}",
            f.text
        );
    }

    #[test]
    fn another_architecture_fails_even_with_the_override() {
        let arm = probed(
            "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n",
            "aarch64",
        );
        let f = cpu_finding(&probed(EPYC, "x86_64"), &arm, true);
        assert_eq!((f.level, f.code), (Level::Fail, "cpu_arch_differs"));
        // On arm64 every feature counts.
        let older = probed("Features\t: fp asimd evtstrm aes\n", "aarch64");
        let f = cpu_finding(&arm, &older, false);
        assert!(
            f.text.contains(": pmull sha1 sha2 crc32 atomics;"),
            "{}",
            f.text
        );
        // A host that said nothing about its CPU: a warning, not a refusal.
        let f = cpu_finding(&arm, &Facts::default(), false);
        assert_eq!((f.level, f.code), (Level::Warn, "cpu_unknown"));
    }
}
