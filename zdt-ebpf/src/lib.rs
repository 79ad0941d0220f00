// The library target exists so that zdt-ctl can name this crate as a build-dependency (cargo
// then rebuilds zdt-ctl when the program's sources change); the program itself is src/main.rs.
#![no_std]
