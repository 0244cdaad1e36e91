"""gpu_check.py's runner, which needs no GPU: one row per check on disk as soon as that check ends, and a failing
check does not stop the ones after it. (Its refusal without CUDA is tested with the Makefile in test_make_chain.)"""
import csv

import gpu_check


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_each_check_is_on_disk_as_it_ends_and_a_failure_does_not_stop_the_rest(tmp_path, capsys):
    checks_csv = tmp_path / "checks.csv"
    seen_on_disk = {}

    def first(config, shared):
        shared["made by first"] = 7
        return "made a thing"

    def second(config, shared):
        seen_on_disk["second"] = [row["check"] for row in read_rows(checks_csv)]
        raise gpu_check.CheckFailed("exit 1: broken (log: somewhere)")

    def third(config, shared):
        seen_on_disk["third"] = [(row["check"], row["result"]) for row in read_rows(checks_csv)]
        return f"used {shared['made by first']}"

    rows = gpu_check.run_checks({"first": first, "second": second, "third": third}, {"out_dir": str(tmp_path)},
                                "Some GPU")

    assert seen_on_disk == {"second": ["first"], "third": [("first", "PASS"), ("second", "FAIL")]}
    on_disk = read_rows(checks_csv)
    assert on_disk == rows
    assert [(row["check"], row["result"], row["detail"]) for row in on_disk] == [
        ("first", "PASS", "made a thing"), ("second", "FAIL", "exit 1: broken (log: somewhere)"),
        ("third", "PASS", "used 7")]
    assert {row["device_name"] for row in on_disk} == {"Some GPU"}
    assert tuple(on_disk[0]) == gpu_check.CHECK_COLUMNS
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed] == [["PASS", "first"], ["FAIL", "second"], ["PASS", "third"]]


def test_an_unexpected_exception_is_a_failed_check_with_its_traceback(tmp_path, capsys):
    """An error gpu_check did not foresee (an API that this torch lacks, say) fails that check alone: the GPU
    run is one call, and the checks after it still give their rows."""
    def missing_api(config, shared):
        return len(None)

    def fine(config, shared):
        return "ok"

    rows = gpu_check.run_checks({"missing api": missing_api, "fine": fine}, {"out_dir": str(tmp_path)}, "Some GPU")
    assert [(row["check"], row["result"]) for row in read_rows(tmp_path / "checks.csv")] == [
        ("missing api", "FAIL"), ("fine", "PASS")]
    assert rows[0]["detail"].startswith("TypeError: object of type 'NoneType' has no len()")
    printed = capsys.readouterr()
    assert "Traceback" in printed.err and "len(None)" in printed.err
    assert printed.out.splitlines()[0].startswith("FAIL  missing api")
