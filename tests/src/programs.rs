//! Programs that are not this build's zdt program, loaded with raw bpf(2) calls (aya loads an
//! object's instructions as they are): a pass-through program, as an app or a stranger might
//! attach or pin, and "another zdt build's program" for the upgrade tests.
use std::{
    ffi::CStr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use aya_obj::generated::{bpf_attach_type, bpf_insn, bpf_prog_type};
use zdt_common::names;

/// The fields of `union bpf_attr` that BPF_PROG_LOAD reads, up to expected_attach_type
/// (include/uapi/linux/bpf.h); the kernel takes a shorter attr as zero-extended.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The bpf(2) syscall with `attr` as its attribute union.
///
/// # Safety
/// `attr` must be the layout the kernel expects for `cmd`, and every pointer in it valid for
/// the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>())
}

/// Loads `insns` as an sk_reuseport program named `name` with `attach_type` (SELECT is 0).
fn load_sk_reuseport(
    insns: &[bpf_insn],
    license: &CStr,
    name: &str,
    attach_type: u32,
) -> anyhow::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut attr = ProgLoad {
        prog_type: bpf_prog_type::BPF_PROG_TYPE_SK_REUSEPORT as u32,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    // SAFETY: the kernel reads the attr and the instructions, both alive for the call.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
    anyhow::ensure!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the program `fd` at `path`.
pub fn pin(fd: &OwnedFd, path: &Path) -> anyhow::Result<()> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjPin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: the kernel reads the attr and the path, both alive for the call.
    let rc = unsafe { bpf(BPF_OBJ_PIN, &mut attr) };
    anyhow::ensure!(rc == 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The kernel's run statistics of the program `fd`: (runs, total run time). They grow only
/// while BPF run-time stats are on.
pub fn run_stats(fd: &OwnedFd) -> anyhow::Result<(u64, std::time::Duration)> {
    // SAFETY: plain data; the kernel fills what it knows.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into info, alive for the call.
    let rc = unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    anyhow::ensure!(
        rc == 0,
        "BPF_OBJ_GET_INFO_BY_FD: {}",
        std::io::Error::last_os_error()
    );
    Ok((
        info.run_cnt,
        std::time::Duration::from_nanos(info.run_time_ns),
    ))
}

/// Attaches the program `fd` to the group of every listener of `:port` (replacing whatever
/// program the group had). Call inside the port's network namespace.
pub fn attach_to_port(fd: &OwnedFd, port: u16) -> anyhow::Result<()> {
    attach_to_spec(fd, &format!(":{port}").parse()?)
}

/// [`attach_to_port`] for the sockets `spec` names (`:PORT/udp`: a UDP port's).
pub fn attach_to_spec(fd: &OwnedFd, spec: &zdt_ctl::addr::PortSpec) -> anyhow::Result<()> {
    for f in zdt_ctl::sockets::matching_listeners(spec)? {
        zdt_ctl::state::attach_program(fd, &f.fd)
            .with_context(|| format!("attaching a program to {spec}"))?;
    }
    Ok(())
}

/// One instruction: `code` with dst r0 and immediate `imm`.
fn insn(code: u8, imm: i32) -> bpf_insn {
    ins(code, 0, 0, 0, imm)
}

fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> bpf_insn {
    // SAFETY: bpf_insn is plain data; all zero is a valid value.
    let mut i: bpf_insn = unsafe { std::mem::zeroed() };
    i.code = code;
    i.set_dst_reg(dst);
    i.set_src_reg(src);
    i.off = off;
    i.imm = imm;
    i
}
/// BPF_ALU64 | BPF_MOV | BPF_K: r0 = imm.
const MOV64_IMM: u8 = 0xb7;
/// BPF_JMP | BPF_EXIT.
const EXIT: u8 = 0x95;

/// Loads `r0 = 1 (SK_PASS); exit` as an sk_reuseport program: another program than zdt's, for
/// the tests where an app installs its own or a pinned state holds a foreign one.
pub fn load_pass_program() -> anyhow::Result<OwnedFd> {
    load_sk_reuseport(&[insn(MOV64_IMM, 1), insn(EXIT, 0)], c"GPL", "pass", 0)
}

/// Loads a program that does nothing but select the socket in slot 0 of the socket array
/// `sockets` (bpf_sk_select_reuseport) and return SK_PASS: the least any steering program does,
/// to tell the cost of a selection on this machine from the cost of zdt's bookkeeping.
pub fn load_select_only(sockets: &aya::maps::MapData) -> anyhow::Result<OwnedFd> {
    load_selecting(sockets, None)
}

/// Loads a program that selects the socket in slot `(hash * n) >> 32` of `sockets` (slots 0 to
/// n - 1, by the flow hash, as zdt picks among an active list of n) and returns SK_PASS: what
/// the kernel's own selection costs when connections spread over n sockets rather than one.
pub fn load_select_by_hash(sockets: &aya::maps::MapData, n: u32) -> anyhow::Result<OwnedFd> {
    load_selecting(sockets, Some(n))
}

/// [`load_select_only`] (`spread` None) and [`load_select_by_hash`].
fn load_selecting(sockets: &aya::maps::MapData, spread: Option<u32>) -> anyhow::Result<OwnedFd> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
    const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const MUL64_IMM: u8 = 0x27;
    const RSH64_IMM: u8 = 0x77;
    const LD_IMM64: u8 = 0x18;
    const ADD64_IMM: u8 = 0x07;
    const CALL: u8 = 0x85;
    const PSEUDO_MAP_FD: u8 = 1;
    const SK_SELECT_REUSEPORT: i32 = 82; // BPF_FUNC_sk_select_reuseport
    /// offsetof(struct sk_reuseport_md, hash) in the UAPI (two pointers, then four u32).
    const MD_HASH: i16 = 32;
    let fd = sockets.fd().as_fd().as_raw_fd();
    let mut insns = vec![ins(MOV64_X, 6, 1, 0, 0)]; // r6 = ctx
    match spread {
        // *(u32 *)(fp - 4) = 0: the key
        None => insns.push(ins(ST_W, 10, 0, -4, 0)),
        Some(n) => {
            let n = i32::try_from(n).context("too many sockets to spread over")?;
            insns.extend([
                ins(LDX_W, 2, 1, MD_HASH, 0), // r2 = ctx->hash (zero-extended)
                ins(MUL64_IMM, 2, 0, 0, n),   // r2 *= n
                ins(RSH64_IMM, 2, 0, 0, 32),  // r2 >>= 32: 0..n-1
                ins(STX_W, 10, 2, -4, 0),     // *(u32 *)(fp - 4) = r2: the key
            ]);
        }
    }
    insns.extend([
        ins(LD_IMM64, 2, PSEUDO_MAP_FD, 0, fd), // r2 = the socket array
        ins(0, 0, 0, 0, 0),
        ins(MOV64_X, 3, 10, 0, 0), // r3 = fp
        ins(ADD64_IMM, 3, 0, 0, -4),
        ins(MOV64_IMM, 4, 0, 0, 0), // r4 = 0 (flags)
        ins(MOV64_X, 1, 6, 0, 0),
        ins(CALL, 0, 0, 0, SK_SELECT_REUSEPORT),
        insn(MOV64_IMM, 1), // SK_PASS
        insn(EXIT, 0),
    ]);
    load_sk_reuseport(
        &insns,
        c"GPL",
        if spread.is_some() {
            "select_hash"
        } else {
            "select_only"
        },
        bpf_attach_type::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE as u32,
    )
}

/// Pins [`load_pass_program`] at `path`.
pub fn pin_pass_program(path: &Path) -> anyhow::Result<()> {
    pin(&load_pass_program()?, path)
}

/// "Another zdt build's program": zdt's own with `r0 = 0` in front (overwritten before it is
/// read). It behaves exactly like zdt's and reads the same maps, but the kernel gives it another
/// tag, as it would a program built from other sources. Loaded against the maps pinned in `dir`.
pub fn load_variant(dir: &Path) -> anyhow::Result<OwnedFd> {
    // The pinned maps stay open until the program is loaded (it refers to them by fd).
    let mut maps = Vec::new();
    let relocated =
        zdt_ctl::program::relocated_instructions(zdt_ctl::addr::Proto::Tcp, |name, def| {
            // The object's UDP maps are pinned for UDP ports only; the TCP program never names them.
            if !dir.join(name).exists() && name.starts_with("ZDT_FLOW") {
                return Ok(-1);
            }
            // The program's global data (.bss) is its own, never pinned: a new one, as a load of
            // the object makes.
            let map = if name.starts_with('.') {
                aya::maps::MapData::create(def.clone(), name, None)
                    .with_context(|| format!("creating the program's {name}"))?
            } else {
                aya::maps::MapData::from_pin(dir.join(name))
                    .with_context(|| format!("map {name} is not pinned in {}", dir.display()))?
            };
            let fd = map.fd().as_fd().as_raw_fd();
            maps.push(map);
            Ok(fd)
        })?;
    let mut insns = vec![insn(MOV64_IMM, 0)];
    insns.extend(relocated);
    let loaded = load_sk_reuseport(
        &insns,
        c"Dual MIT/GPL",
        names::PROGRAM,
        bpf_attach_type::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE as u32,
    );
    drop(maps);
    loaded
}

/// Puts the variant where zdt's program was on `port`, as an upgrade by another zdt build
/// would: loaded against the port's pinned maps, attached to the group of every listener of
/// `:port`, pinned over the program's pin. Call inside the port's network namespace.
pub fn install_variant(port: u16) -> anyhow::Result<OwnedFd> {
    let dir = zdt_ctl::state::port_dir(port.into())?;
    let fd = load_variant(&dir)?;
    attach_to_port(&fd, port)?;
    // Pinned beside, then renamed over: the pin changes in one step, as zdt's does.
    let staged = dir.join("zdt_select_variant");
    pin(&fd, &staged)?;
    std::fs::rename(&staged, dir.join(names::PROGRAM))?;
    Ok(fd)
}
