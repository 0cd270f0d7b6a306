function tok(){return sessionStorage.getItem('preannot-token')||''}
function saveTok(){sessionStorage.setItem('preannot-token',document.getElementById('token').value)}
async function act(path){
  const r=await fetch(path,{method:'POST',headers:{'Authorization':'Bearer '+tok()}});
  const t=await r.text(); document.getElementById('msg').textContent=r.status+' '+t; if(r.ok){setTimeout(()=>location.reload(),800)}
}
window.addEventListener('load',()=>{document.getElementById('token').value=tok()});
