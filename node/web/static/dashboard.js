function tok(){return sessionStorage.getItem('preannot-token')||''}
function saveTok(){sessionStorage.setItem('preannot-token',document.getElementById('token').value)}
async function act(path){
  const r=await fetch(path,{method:'POST',headers:{'Authorization':'Bearer '+tok()}});
  const t=await r.text(); document.getElementById('msg').textContent=r.status+' '+t; if(r.ok){setTimeout(()=>location.reload(),800)}
}
async function judge(job){
  const rows=[...document.querySelectorAll('tr[data-finding]')];
  const open=rows.filter(r=>!document.querySelector(`input[name=f${r.dataset.finding}]:checked`));
  if(open.length){document.getElementById('msg').textContent='judge every finding first (not yet: '+
    open.map(r=>r.dataset.finding).join(', ')+')';return;}
  const findings=rows.map(r=>{const n=+r.dataset.finding;
    return {finding:n,outcome:document.querySelector(`input[name=f${n}]:checked`).value,
            note:document.querySelector(`input[name=note${n}]`).value||null}});
  const body={findings,added:+document.getElementById('added').value||0,observer_role:document.getElementById('role').value};
  const r=await fetch(`/api/jobs/${job}/verdict`,{method:'POST',body:JSON.stringify(body),
    headers:{'Authorization':'Bearer '+tok(),'Content-Type':'application/json'}});
  document.getElementById('msg').textContent=r.status+' '+await r.text();
}
window.addEventListener('load',()=>{document.getElementById('token').value=tok()});
