-- Orthanc: send the radiologist's verdict objects (SEG, SR, KO made on workstations or uploaded) to
-- preannot (declared in DicomModalities as "preannot"), so that it learns what was accepted, edited or
-- rejected. preannot examines only the studies it sent results for and recognises its own objects, but
-- this rule already leaves out what preannot itself stored (RemoteAET PREANNOT), to keep traffic small.
-- Load it beside route-to-preannot.lua: "LuaScripts": ["route-to-preannot.lua", "verdicts.lua"].

local VERDICT_MODALITIES = { SEG = true, SR = true, KO = true }
-- Orthanc's scripts share one Lua context: keep the routing rule's handler (loaded first) and call it
local routeStableSeries = OnStableSeries

function OnStableSeries(seriesId, tags, metadata)
  if routeStableSeries ~= nil then
    routeStableSeries(seriesId, tags, metadata)
  end
  if not VERDICT_MODALITIES[tags['Modality'] or ''] then
    return
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  local remote = RestApiGet('/instances/' .. first .. '/metadata?expand')
  if string.find(remote, '"RemoteAET"%s*:%s*"PREANNOT"') then
    return  -- preannot's own results
  end
  print('sending verdict series ' .. seriesId .. ' (' .. tags['Modality'] .. ') to preannot')
  RestApiPost('/modalities/preannot/store', seriesId, true)
end
