"""Start-up cost: what importing the package and answering --help pulls in (fresh interpreters)."""
import subprocess
import sys


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_seqnorm_does_not_load_dynamo():
    """torch.compiler.disable imports torch._dynamo (~2 s); seqnorm defers it until a compile traces a layer."""
    code = "import sys, seqnorm; print('torch._dynamo' in sys.modules)"
    assert run_python(code).strip() == "False"


def test_cli_help_needs_no_torch():
    code = ("import sys\nfrom lm.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--preset" in done.stdout and done.stderr.strip().endswith("False")
