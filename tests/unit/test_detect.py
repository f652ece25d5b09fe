"""``--profile auto``: fixture /proc files of real boards pick the right firmware profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeslice.firmware_profiles import list_profiles
from edgeslice.firmware_profiles.cli import profiles_group
from edgeslice.firmware_profiles.detect import (
    BoardFacts,
    choose_profile,
    detect,
    parse_facts,
    pi_revision_ram_mb,
    read_facts,
    resolve_profile,
)


def arm_cpuinfo(
    cores: int, part: str, variant: str = "0x0", pi: tuple[str, str] | None = None
) -> str:
    """/proc/cpuinfo of a 64-bit ARM kernel; ``pi`` = (Revision, Model) lines of a Pi."""
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
        "CPU part\t: {part}\nCPU revision\t: 3\n\n"
    )
    text = "".join(block.format(n=n, part=part, variant=variant) for n in range(cores))
    if pi is not None:
        revision, model = pi
        text += f"Revision\t: {revision}\nSerial\t\t: 10000000a1b2c3d4\nModel\t\t: {model}\n"
    return text


def x86_cpuinfo(cores: int, name: str) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 142\n"
        "model name\t: {name}\nstepping\t: 10\ncpu MHz\t\t: 1800.000\ncache size\t: 6144 KB\n"
        "cpu cores\t: {cores}\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge "
        "mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm "
        "constant_tsc avx2\n\n"
    )
    return "".join(block.format(n=n, name=name, cores=cores) for n in range(cores))


def meminfo(kb: int) -> str:
    return f"MemTotal:       {kb} kB\nMemFree:         {kb // 2} kB\nMemAvailable:   {kb // 3} kB\n"


# name -> (device-tree model or None, cpuinfo, MemTotal kB): as read on the boards
BOARDS: dict[str, tuple[str | None, str, int]] = {
    "rpi3b": (
        "Raspberry Pi 3 Model B Rev 1.2\x00",
        arm_cpuinfo(4, "0xd03", pi=("a02082", "Raspberry Pi 3 Model B Rev 1.2")),
        944_268,
    ),
    "rpi4-2gb": (
        "Raspberry Pi 4 Model B Rev 1.4\x00",
        arm_cpuinfo(4, "0xd08", pi=("b03114", "Raspberry Pi 4 Model B Rev 1.4")),
        1_867_048,
    ),
    "rpi4-4gb": (
        "Raspberry Pi 4 Model B Rev 1.4\x00",
        arm_cpuinfo(4, "0xd08", pi=("c03114", "Raspberry Pi 4 Model B Rev 1.4")),
        3_884_376,
    ),
    "rpi4-8gb": (
        "Raspberry Pi 4 Model B Rev 1.4\x00",
        arm_cpuinfo(4, "0xd08", pi=("d03114", "Raspberry Pi 4 Model B Rev 1.4")),
        7_999_904,
    ),
    "rpi5-4gb": (
        "Raspberry Pi 5 Model B Rev 1.0\x00",
        arm_cpuinfo(4, "0xd0b", variant="0x4", pi=("c04170", "Raspberry Pi 5 Model B Rev 1.0")),
        4_147_088,
    ),
    "rpi5-8gb": (
        "Raspberry Pi 5 Model B Rev 1.0\x00",
        arm_cpuinfo(4, "0xd0b", variant="0x4", pi=("d04170", "Raspberry Pi 5 Model B Rev 1.0")),
        8_245_168,
    ),
    "jetson-nano": ("NVIDIA Jetson Nano Developer Kit\x00", arm_cpuinfo(4, "0xd07"), 4_059_712),
    "jetson-orin-nano": (
        "NVIDIA Jetson Orin Nano Developer Kit\x00",
        arm_cpuinfo(6, "0xd42", variant="0x1"),
        7_620_240,
    ),
    "x86-laptop": (None, x86_cpuinfo(4, "Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz"), 7_976_420),
}


def board_root(tmp_path: Path, model: str | None, cpuinfo: str, mem_kb: int) -> Path:
    """A directory laid out like / with the three files detection reads."""
    proc = tmp_path / "proc"
    (proc / "device-tree").mkdir(parents=True)
    if model is not None:
        (proc / "device-tree" / "model").write_bytes(model.encode())
    (proc / "cpuinfo").write_text(cpuinfo)
    (proc / "meminfo").write_text(meminfo(mem_kb))
    return tmp_path


@pytest.mark.parametrize("expected", sorted(BOARDS))
def test_each_supported_board_gets_its_own_profile_without_a_warning(
    expected: str, tmp_path: Path
) -> None:
    found = detect(board_root(tmp_path, *BOARDS[expected]))
    assert found.profile == expected
    assert found.exact, found.reason
    assert found.warning is None


def test_pi_ram_comes_from_the_revision_code_and_else_from_memtotal(tmp_path: Path) -> None:
    assert pi_revision_ram_mb("c03114") == 4096
    assert pi_revision_ram_mb("d04170") == 8192
    assert pi_revision_ram_mb("b03114") == 2048
    assert pi_revision_ram_mb("000e") == 0  # old-style code: RAM not encoded
    assert pi_revision_ram_mb("not-hex") == 0
    # a 4 GB Pi 4 whose kernel prints no Revision line (a container): MemTotal decides
    model = "Raspberry Pi 4 Model B Rev 1.5\x00"
    found = detect(board_root(tmp_path, model, arm_cpuinfo(4, "0xd08"), 3_884_376))
    assert (found.profile, found.exact) == ("rpi4-4gb", True)
    assert found.facts.cpu == "Cortex-A72"


def test_the_cpuinfo_model_line_names_a_pi_without_a_device_tree(tmp_path: Path) -> None:
    cpuinfo = arm_cpuinfo(4, "0xd0b", pi=("d04170", "Raspberry Pi 5 Model B Rev 1.0"))
    found = detect(board_root(tmp_path, None, cpuinfo, 8_245_168))
    assert found.profile == "rpi5-8gb"
    assert found.facts.model == "Raspberry Pi 5 Model B Rev 1.0"


@pytest.mark.parametrize(
    ("model", "cpuinfo", "mem_kb", "expected", "named"),
    [
        # 3B+: 1.4 GHz, not the 3B's 1.2: the 3B profile, with a warning
        (
            "Raspberry Pi 3 Model B Plus Rev 1.3",
            arm_cpuinfo(4, "0xd03", pi=("a020d3", "Raspberry Pi 3 Model B Plus Rev 1.3")),
            944_268,
            "rpi3b",
            "Raspberry Pi 3 Model B Plus",
        ),
        # a 16 GB Pi 5: the family's largest profile
        (
            "Raspberry Pi 5 Model B Rev 1.1",
            arm_cpuinfo(4, "0xd0b", pi=("e04171", "Raspberry Pi 5 Model B Rev 1.1")),
            16_608_000,
            "rpi5-8gb",
            "16.0 GiB",
        ),
        # a 1 GB Pi 4: the smallest Pi 4 profile
        (
            "Raspberry Pi 4 Model B Rev 1.1",
            arm_cpuinfo(4, "0xd08", pi=("a03111", "Raspberry Pi 4 Model B Rev 1.1")),
            948_304,
            "rpi4-2gb",
            "1024 MiB",
        ),
        # an unknown 8-core aarch64 board with 16 GB: nearest by cores and RAM
        ("Radxa ROCK 5B", arm_cpuinfo(8, "0xd0b"), 16_090_000, "jetson-orin-nano", "ROCK 5B"),
        # a 16-core x86 desktop: the one x86 profile, flagged as a loose fit
        (
            None,
            x86_cpuinfo(16, "AMD Ryzen 9 5950X 16-Core Processor"),
            65_000_000,
            "x86-laptop",
            "16 cores",
        ),
    ],
)
def test_an_unknown_board_gets_the_nearest_profile_and_a_warning_naming_both(
    tmp_path: Path, model: str | None, cpuinfo: str, mem_kb: int, expected: str, named: str
) -> None:
    found = detect(board_root(tmp_path, model, cpuinfo, mem_kb))
    assert found.profile == expected
    assert not found.exact
    assert found.warning is not None
    assert named in found.warning and expected in found.warning


def test_architecture_outweighs_cores_and_ram() -> None:
    profiles = list_profiles()
    riscv = BoardFacts(model="StarFive VisionFive 2", arch="riscv64", cores=4, ram_mb=8192)
    arm = BoardFacts(model="Some board", arch="aarch64", cores=4, ram_mb=8000)
    x86 = BoardFacts(model="", arch="x86_64", cores=2, ram_mb=2048)
    assert choose_profile(arm, profiles).profile in {"rpi4-8gb", "rpi5-8gb"}
    assert choose_profile(x86, profiles).profile == "x86-laptop"
    assert not choose_profile(riscv, profiles).exact
    nothing = BoardFacts(model="", arch="", cores=0, ram_mb=0)  # every file missing
    assert choose_profile(nothing, profiles).profile in {p.name for p in profiles}


def test_parse_facts_fills_gaps_from_the_running_machine() -> None:
    facts = parse_facts(None, None, None, machine="arm64", cpu_count=4, ram_bytes=4 << 30)
    assert (facts.arch, facts.cores, facts.ram_mb) == ("aarch64", 4, 4096)
    assert parse_facts(None, None, None, machine="armv7l").arch == "armv7l"


def test_this_machine_and_resolve_profile() -> None:
    facts = read_facts("/")
    assert facts.cores >= 1 and facts.ram_mb > 0 and facts.arch
    name, _warning = resolve_profile("auto")
    assert name in {p.name for p in list_profiles()}
    assert resolve_profile("rpi4-4gb") == ("rpi4-4gb", None)


def test_profiles_detect_prints_the_choice_and_why(tmp_path: Path) -> None:
    root = board_root(tmp_path, *BOARDS["rpi4-4gb"])
    result = CliRunner().invoke(profiles_group, ["detect", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "profile   rpi4-4gb" in result.output
    assert "Raspberry Pi 4 Model B Rev 1.4" in result.output
    assert "WARNING" not in result.output
    as_json = CliRunner().invoke(profiles_group, ["detect", "--root", str(root), "--json"])
    data = json.loads(as_json.output)
    assert data["profile"] == "rpi4-4gb" and data["exact"] is True
    assert data["detected"]["ram_mb"] == 4096


def test_profiles_detect_warns_on_a_loose_fit(tmp_path: Path) -> None:
    root = board_root(tmp_path, None, x86_cpuinfo(16, "AMD Ryzen 9 5950X"), 65_000_000)
    result = CliRunner().invoke(profiles_group, ["detect", "--root", str(root)])
    assert result.exit_code == 0
    assert "profile   x86-laptop" in result.output
    assert "WARNING: --profile auto: no shipped profile for an x86_64 machine" in result.output
