"""Read what a Go binary is built for, from its bytes (no Go toolchain needed).

``inspect(data)`` returns the executable format (ELF, PE or Mach-O) and the machine its
header names, as a GOARCH, and ``build_info(data)`` the build settings Go records in every
binary (what ``go version -m`` prints: ``GOOS``, ``GOARCH``, ``GOARM``, ``-trimpath``, ...),
which stripping with ``-ldflags=-s -w`` keeps (read by kiln/gomod/buildinfo.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kiln.gomod.buildinfo import decode_build_info

ELF_MAGIC = b"\x7fELF"
PE_MAGIC = b"MZ"
#: 64-bit Mach-O, little-endian, as it appears in the file
MACHO64_MAGIC = b"\xcf\xfa\xed\xfe"

#: ELF e_machine values
EM_386 = 3
EM_MIPS = 8
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243
EM_LOONGARCH = 258
#: ELF EI_OSABI values Go writes
ELFOSABI_NONE = 0
ELFOSABI_FREEBSD = 9
ELFOSABI_OPENBSD = 12
#: ELF ARM e_flags: the EABI version lives in the top byte
EF_ARM_EABIMASK = 0xFF000000
EF_ARM_EABI_VER5 = 0x05000000
#: PE COFF machine values
IMAGE_FILE_MACHINE_I386 = 0x14C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_FILE_MACHINE_ARM64 = 0xAA64
#: Mach-O cputype values
CPU_TYPE_X86_64 = 0x01000007
CPU_TYPE_ARM64 = 0x0100000C


@dataclass(frozen=True)
class Executable:
    """The header facts of one executable."""

    #: "elf", "pe" or "macho"
    format: str
    #: the GOARCH the header's machine field names ("" when unknown)
    arch: str
    bits: int
    byteorder: str
    #: the raw machine field: ELF e_machine, PE Machine, Mach-O cputype
    machine: int
    #: ELF only: EI_OSABI and e_flags
    osabi: int = 0
    flags: int = 0


def _elf(data: bytes) -> Executable:
    bits = {1: 32, 2: 64}[data[4]]
    order = {1: "little", 2: "big"}[data[5]]
    end = "<" if order == "little" else ">"
    machine = struct.unpack_from(end + "H", data, 0x12)[0]
    flags = struct.unpack_from(end + "I", data, 0x24 if bits == 32 else 0x30)[0]
    arch = {
        EM_386: "386", EM_X86_64: "amd64", EM_AARCH64: "arm64", EM_ARM: "arm",
        EM_RISCV: "riscv64", EM_S390: "s390x", EM_LOONGARCH: "loong64",
    }.get(machine, "")
    if machine == EM_MIPS:
        arch = ("mips64" if bits == 64 else "mips") + ("le" if order == "little" else "")
    elif machine == EM_PPC64:
        arch = "ppc64le" if order == "little" else "ppc64"
    return Executable("elf", arch, bits, order, machine, osabi=data[7], flags=flags)


def _pe(data: bytes) -> Executable:
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe_offset:pe_offset + 4] != b"PE\0\0":
        raise ValueError("MZ header without a PE signature")
    (machine,) = struct.unpack_from("<H", data, pe_offset + 4)
    # the optional header's magic tells PE32 (0x10b) from PE32+ (0x20b)
    (magic,) = struct.unpack_from("<H", data, pe_offset + 24)
    arch = {IMAGE_FILE_MACHINE_I386: "386", IMAGE_FILE_MACHINE_AMD64: "amd64",
            IMAGE_FILE_MACHINE_ARM64: "arm64"}.get(machine, "")
    return Executable("pe", arch, 64 if magic == 0x20B else 32, "little", machine)


def _macho(data: bytes) -> Executable:
    (cputype,) = struct.unpack_from("<I", data, 4)
    arch = {CPU_TYPE_X86_64: "amd64", CPU_TYPE_ARM64: "arm64"}.get(cputype, "")
    return Executable("macho", arch, 64, "little", cputype)


def inspect(data: bytes) -> Executable:
    """Return the format and machine of an executable's bytes; raise ValueError if unknown."""
    if data.startswith(ELF_MAGIC):
        return _elf(data)
    if data.startswith(PE_MAGIC):
        return _pe(data)
    if data.startswith(MACHO64_MAGIC):
        return _macho(data)
    raise ValueError(f"not an ELF, PE or 64-bit Mach-O executable (starts {data[:8].hex()})")


def build_info(data: bytes) -> tuple[str, dict[str, str]]:
    """Return the Go version and the ``build`` settings recorded in a Go binary."""
    info = decode_build_info(data)
    return info.go_version, dict(info.settings)
