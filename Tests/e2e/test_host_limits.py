"""cubicled and the host's own limits. These change host-wide settings (and put them back), so they run in
the serial phase of `make test`, alone (`-m serial`)."""
import pytest

from conftest import PRODUCTS

pytestmark = pytest.mark.serial


def file_numbers():
    with open("/proc/sys/fs/file-nr") as f:
        allocated = int(f.read().split()[0])
    with open("/proc/sys/fs/file-max") as f:
        return allocated, int(f.read())


@pytest.fixture
def small_file_table():
    """file-max set to what the host holds plus 100,000 (a host one session could fill), put back after."""
    allocated, saved = file_numbers()
    with open("/proc/sys/fs/file-max", "w") as f:
        f.write(str(allocated + 100_000))
    yield allocated + 100_000
    with open("/proc/sys/fs/file-max", "w") as f:
        f.write(str(saved))


def test_cubicled_raises_file_max_to_back_its_sessions(start_daemon, small_file_table):
    """maxSessions sessions of the largest runtime, each holding what its memory can back (256 bytes a
    file, FileBudget), must fit in the host's file table: cubicled raises fs.file-max at start and says so."""
    d = start_daemon(f"""
maxSessions: 4
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB, pids: 64, openFiles: 2048}}
""")
    allocated, file_max = file_numbers()
    assert file_max >= small_file_table + 4 * min((256 << 20) // 256, 64 * (2048 + 65530)), file_max
    assert "raised fs.file-max" in d.log_text()
