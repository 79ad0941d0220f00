use which::which;

/// Building this crate for BPF links with bpf-linker; make cargo rebuild when it changes (a
/// new linker can change the object).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
