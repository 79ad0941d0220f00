//! The steering program this zdt-ctl carries: its object, its kernel tag computed without the
//! verifier, and loading it (fresh for `attach`, against a port's pinned maps for `upgrade`).
//!
//! Every command checks that the pinned program is this build's before it trusts the maps. The
//! check compares the pinned program's tag with the tag of our own program. The kernel computes
//! a tag in `bpf_prog_calc_tag()` (kernel/bpf/core.c) when a program is loaded, before the
//! verifier runs: a hash of the instructions as the loader passed them, with the map references
//! of `ld_imm64` (both halves' `imm`: the map fd, or the fd and the value offset) set to zero,
//! so that a tag does not depend on fd numbers. Older kernels take the first 8 bytes of the
//! SHA-1 of those instructions (6.1 does), newer ones of the SHA-256 (6.18 does). We relocate the
//! object exactly as aya does before it calls BPF_PROG_LOAD (maps, then bpf-to-bpf calls) and
//! hash the result both ways. A load through the verifier (about 100 ms of kernel CPU, plus a
//! parse of the kernel's BTF) is then needed only where a program is really loaded: attach and
//! upgrade. The test `upgrade::tag_is_the_kernels` loads the program and compares.
use std::{collections::HashSet, os::fd::RawFd, path::Path};

use crate::addr::Proto;
use anyhow::Context as _;
use aya::{programs::SkReuseport, Ebpf, EbpfLoader};
use aya_obj::generated::bpf_insn;
use sha1::Digest as _;

/// The BPF object built from zdt-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zdt"));

/// The BPF object (an ELF file) this zdt-ctl carries.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// `BPF_LD | BPF_IMM | BPF_DW`: the first half of a 64-bit immediate load.
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_MAP_VALUE: u8 = 2;

/// The tags the kernel gives this build's program for `proto`'s ports: [SHA-1 based, SHA-256
/// based]. A pinned program is ours when its tag is one of them (which one depends on the
/// running kernel).
pub fn expected_tags(proto: Proto) -> anyhow::Result<[u64; 2]> {
    static TCP: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
    static UDP: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
    let cell = match proto {
        Proto::Tcp => &TCP,
        Proto::Udp => &UDP,
    };
    if let Some(t) = cell.get() {
        return Ok(*t);
    }
    let insns = tag_input(proto)?;
    let first8 = |d: &[u8]| u64::from_be_bytes(d[..8].try_into().expect("digest >= 8 bytes"));
    let tags = [
        first8(&sha1::Sha1::digest(&insns)),
        first8(&sha2::Sha256::digest(&insns)),
    ];
    Ok(*cell.get_or_init(|| tags))
}

/// This build's tag on the running kernel, as text: the one of [`expected_tags`] that a load
/// here produces is not known without loading, so both are named.
pub fn expected_tag(proto: Proto) -> anyhow::Result<String> {
    let [sha1, sha256] = expected_tags(proto)?;
    Ok(format!(
        "tag {sha256:016x}, or {sha1:016x} on kernels that hash with SHA-1"
    ))
}

/// Whether `tag` (as `bpf_prog_info.tag` gives it, read big-endian) is this build's program
/// for `proto`'s ports.
pub fn is_ours(proto: Proto, tag: u64) -> anyhow::Result<bool> {
    Ok(expected_tags(proto)?.contains(&tag))
}

/// The instructions of `proto`'s program (`zdt_select`, `zdt_select_udp`) as aya passes them to
/// BPF_PROG_LOAD: the object relocated as aya relocates it (maps, then bpf-to-bpf calls), each
/// map's `ld_imm64` holding the fd that `map_fd` gives for the map's name and definition.
pub fn relocated_instructions(
    proto: Proto,
    mut map_fd: impl FnMut(&str, &aya_obj::Map) -> anyhow::Result<RawFd>,
) -> anyhow::Result<Vec<bpf_insn>> {
    let name = proto.program();
    let mut obj = aya_obj::Object::parse(OBJECT).context("parsing the BPF object")?;
    // CO-RE relocations would make the instructions depend on the running kernel's BTF; the
    // program has none (it reads only its own maps and the sk_reuseport context, which the
    // verifier rewrites after the tag is taken).
    anyhow::ensure!(
        !obj.has_btf_relocations(),
        "the BPF object has CO-RE relocations: its instructions depend on the kernel's BTF"
    );
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(n, m)| Ok((n.clone(), map_fd(n, m)?, m.clone())))
        .collect::<anyhow::Result<_>>()?;
    obj.relocate_maps(
        maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .context("relocating the BPF object's maps")?;
    obj.relocate_calls(&text_sections)
        .context("relocating the BPF object's calls")?;
    let program = obj
        .programs
        .get(name)
        .with_context(|| format!("BPF object has no program {name}"))?;
    let function = obj
        .functions
        .remove(&program.function_key())
        .with_context(|| format!("BPF object has no code for {name}"))?;
    Ok(function.instructions)
}

/// The instructions of `proto`'s program as the kernel hashes them for the tag.
fn tag_input(proto: Proto) -> anyhow::Result<Vec<u8>> {
    // The fd value is irrelevant: the kernel zeroes it before hashing, and so do we below.
    let instructions = relocated_instructions(proto, |_, _| Ok(0))?;
    let mut out = Vec::with_capacity(instructions.len() * 8);
    let mut was_ld_map = false;
    for insn in &instructions {
        let mut imm = insn.imm;
        // The same rule as bpf_prog_calc_tag(): the first half of a map load, and the second
        // half when it looks like one (all fields but imm zero).
        if !was_ld_map
            && insn.code == LD_IMM64
            && matches!(insn.src_reg(), PSEUDO_MAP_FD | PSEUDO_MAP_VALUE)
        {
            was_ld_map = true;
            imm = 0;
        } else if was_ld_map
            && insn.code == 0
            && insn.dst_reg() == 0
            && insn.src_reg() == 0
            && insn.off == 0
        {
            was_ld_map = false;
            imm = 0;
        } else {
            was_ld_map = false;
        }
        out.push(insn.code);
        out.push(insn.dst_reg() | (insn.src_reg() << 4));
        out.extend_from_slice(&insn.off.to_le_bytes());
        out.extend_from_slice(&imm.to_le_bytes());
    }
    Ok(out)
}

/// Loads the object with fresh maps (for `attach`), a UDP port's flow table sized for `flows`
/// flows (a TCP port's program never reads it: one entry). The caller pins what it needs.
pub fn load_fresh(flows: u32) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .map_max_entries(zdt_common::names::FLOWS, flows.max(1))
        .load(OBJECT)
        .context("loading the BPF object")
}

/// Loads the object so that it uses the maps pinned in `dir` instead of new ones (for
/// `upgrade`): aya opens a map pinned at the given path rather than creating it. The caller has
/// checked that the pinned maps have the shape this build expects; `flows` is the pinned flow
/// table's size.
pub fn load_against(dir: &Path, maps: &[&'static str], flows: u32) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(zdt_common::names::FLOWS, flows.max(1));
    for name in maps {
        loader.map_pin_path(name, dir.join(name));
    }
    loader
        .load(OBJECT)
        .context("loading the BPF object against the pinned maps")
}

/// `proto`'s program of a loaded object, loaded into the kernel (the verifier runs here).
pub fn load_program(ebpf: &mut Ebpf, proto: Proto) -> anyhow::Result<&mut SkReuseport> {
    let name = proto.program();
    let program: &mut SkReuseport = ebpf
        .program_mut(name)
        .with_context(|| format!("BPF object has no program {name}"))?
        .try_into()?;
    program
        .load()
        .context("loading the sk_reuseport program (the kernel verifier rejected it)")?;
    Ok(program)
}
