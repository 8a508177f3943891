import numpy as np
import probeinterface as pi
import pytest
from probeinterface.neuropixels_tools import build_neuropixels_probe

from si_ks2py.probe import channel_map, nearest_channels, probe_from_recording
from conftest import generate_recording


def wired(probe, n):
    probe.set_device_channel_indices(np.arange(n))
    return probe


def test_neuropixels_1_slice():
    np1 = build_neuropixels_probe("NP1000")
    probe = wired(np1.get_slice(np.arange(48)), 48)
    m = channel_map(probe)
    assert m.NchanTOT == 48
    np.testing.assert_array_equal(m.chanMap, np.arange(48))
    np.testing.assert_allclose(np.c_[m.xc, m.yc], probe.contact_positions)
    assert np.all(m.kcoords == 0)


def test_neuropixels_2_four_shanks():
    np2 = build_neuropixels_probe("NP2014")
    selection = np.concatenate([np.flatnonzero(np2.shank_ids == s)[:24] for s in ("0", "1", "2", "3")])
    probe = wired(np2.get_slice(selection), len(selection))
    m = channel_map(probe)
    assert np.unique(m.kcoords).tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(m.kcoords, np.repeat([0, 1, 2, 3], 24))
    # neighbourhoods smaller than a shank stay on their shank
    near = nearest_channels(m.xc, m.yc, m.kcoords, 16)
    assert np.all(m.kcoords[near] == m.kcoords[:, None])


def test_generated_multi_column_probe_and_wiring_order():
    probe = pi.generate_multi_columns_probe(num_columns=4, num_contact_per_column=8, xpitch=16, ypitch=20)
    wiring = np.random.default_rng(0).permutation(32)
    probe.set_device_channel_indices(wiring)
    m = channel_map(probe)
    np.testing.assert_array_equal(m.chanMap, np.arange(32))
    # channel c's position is that of the contact wired to c
    np.testing.assert_allclose(m.xc[wiring], probe.contact_positions[:, 0])


def test_probe_group_and_unconnected_contacts():
    a = pi.generate_linear_probe(num_elec=8)
    b = pi.generate_linear_probe(num_elec=8)
    b.move([500, 0])
    a.set_device_channel_indices(np.arange(8))
    b.set_device_channel_indices(np.r_[8:15, -1])  # last contact not connected
    group = pi.ProbeGroup()
    group.add_probe(a)
    group.add_probe(b)
    m = channel_map(group, n_channels=16)
    assert m.NchanTOT == 16 and len(m.chanMap) == 15
    np.testing.assert_array_equal(m.kcoords, np.r_[[0] * 8, [1] * 7])


def test_recording_mapping_matches_channel_locations():
    recording, _ = generate_recording(duration=1.0, num_channels=16, num_units=2)
    m = probe_from_recording(recording)
    np.testing.assert_allclose(np.c_[m.xc, m.yc], recording.get_channel_locations()[m.chanMap])


def test_recording_without_probe_is_a_clear_error_whose_advice_works(tmp_path):
    import spikeinterface.core as sc

    def no_probe():
        return sc.NumpyRecording([np.zeros((1000, 4), dtype="float32")], sampling_frequency=30000.0)

    with pytest.raises(ValueError, match="no probe attached") as caught:
        probe_from_recording(no_probe())
    probe = wired(pi.generate_linear_probe(num_elec=4), 4)
    group = pi.ProbeGroup()
    group.add_probe(probe)
    pi.write_prb(tmp_path / "probe.prb", group)
    # the two ways the message gives, as it writes them
    assert "recording.set_probegroup(probeinterface.read_prb(path))" in str(caught.value)
    recording = no_probe()
    recording.set_probegroup(pi.read_prb(tmp_path / "probe.prb"))
    assert probe_from_recording(recording).NchanTOT == 4
    assert "recording.set_probe(probe)" in str(caught.value)
    recording = no_probe()
    recording.set_probe(probe)
    np.testing.assert_allclose(probe_from_recording(recording).yc, probe.contact_positions[:, 1])


def test_probe_without_wiring_is_a_clear_error():
    with pytest.raises(ValueError, match="device_channel_indices"):
        channel_map(pi.generate_linear_probe(num_elec=4))
