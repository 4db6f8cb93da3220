import os
import pickle

import pytest

from cmmasksd.data.safe_pickle import UnsafePickleError, load_pickle


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, 3, pickle.HIGHEST_PROTOCOL])
def test_plain_data_round_trips(tmp_path, protocol):
    data = [{"ref_id": 1, "sent": "the red circle", "score": 0.5, "ok": True, "none": None,
             "sentences": [{"tokens": ["a", "b"], "sent_id": 3}], "pair": (1, 2), "big": 2**70}]
    if protocol >= 3:  # before protocol 3, Python 3 bytes need a global (_codecs.encode)
        data[0]["raw"] = b"x"
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_pickle(path) == data


def test_python2_byte_strings_load_as_str(tmp_path):
    # What Python 2's cPickle.dumps({'sent': 'the cat'}, 2) writes: SHORT_BINSTRING values.
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02}q\x00U\x04sentq\x01U\x07the catq\x02s.")
    assert load_pickle(path) == {"sent": "the cat"}


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "evil": _Payload(marker)}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*posix\.system"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("value, name", [({1, 2}, r"__builtin__\.set"), (pickle.PickleError(), "PickleError")])
def test_any_global_is_refused(tmp_path, value, name):
    path = tmp_path / "x.p"
    path.write_bytes(pickle.dumps(value, protocol=2))
    with pytest.raises(UnsafePickleError, match=name):
        load_pickle(path)


def test_garbage_names_the_file(tmp_path):
    path = tmp_path / "broken.p"
    path.write_bytes(b"\x80\x02]q\x00(K\x01")  # truncated
    with pytest.raises(ValueError, match="broken.p: not a readable pickle"):
        load_pickle(path)
