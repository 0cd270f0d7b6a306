-- Orthanc: forward the radiologist's verdict objects (SEG, SR, KO made on workstations) to preannot.
-- Load with "LuaScripts": ["verdicts.lua"] in orthanc.json; "PREANNOT" must be in "DicomModalities".
-- preannot examines only the studies it sent results for and ignores its own objects coming back, so
-- forwarding every SEG/SR/KO is safe; restricting to workstation AE titles keeps the traffic small.

local WORKSTATIONS = { OHIF = true, SLICER = true, WEASIS = true, VIEWER = true }
local VERDICT_MODALITIES = { SEG = true, SR = true, KO = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
   local modality = tags['Modality'] or ''
   local remote = metadata['RemoteAET'] or ''
   if VERDICT_MODALITIES[modality] and (WORKSTATIONS[remote] or origin['RequestOrigin'] == 'RestApi') then
      SendToModality(instanceId, 'PREANNOT')
   end
end
