#!/usr/bin/env python3
"""Writes DICOM instances derived from pydicom's sample files into OUT_DIR and prints a JSON
manifest: each file with its identifying attributes (to prove none reaches the ledger).

Usage: dicom_samples.py OUT_DIR COUNT

Each sample is copied with a new SOP Instance UID (and a new Study/Series UID per copy), keeping
its patient attributes, until COUNT instances exist. Big-endian and deflated transfer syntaxes
are left out (storescu would transcode them, so the bytes sent would not be the file's)."""
import json
import os
import sys
import warnings

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

warnings.simplefilter("ignore")
out, count = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
base = os.path.dirname(get_testdata_file("CT_small.dcm"))
SKIP_TS = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
IDENTIFYING = ["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "OtherPatientIDs", "InstitutionName", "ReferringPhysicianName", "StudyID"]

sources = []
for name in sorted(os.listdir(base)):
    if not name.endswith(".dcm"):
        continue
    try:
        ds = pydicom.dcmread(os.path.join(base, name))
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts in SKIP_TS or "SOPClassUID" not in ds or "SOPInstanceUID" not in ds or "PixelData" not in ds:
            continue
        if len(ds.PixelData) < 16:
            continue
        sources.append(name)
    except Exception:
        continue

manifest = []
i = 0
while len(manifest) < count and sources:
    name = sources[i % len(sources)]
    ds = pydicom.dcmread(os.path.join(base, name))
    copy = len(manifest) // len(sources)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    path = os.path.join(out, f"{len(manifest):03d}-{name}")
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception:
        # A sample pydicom cannot write back (inconsistent encoding): leave it out.
        sources.remove(name)
        if os.path.exists(path):
            os.remove(path)
        continue
    phi = []
    for kw in IDENTIFYING:
        v = str(ds.get(kw, "") or "").strip()
        if len(v) >= 4:
            phi.append(v)
    manifest.append({
        "path": path,
        "source": name,
        "copy": copy,
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "uids": [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)],
        "phi": phi,
    })
    i += 1
print(json.dumps(manifest))
