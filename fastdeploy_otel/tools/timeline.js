(function(){
  var mode='a';
  var tl=document.getElementById('tl');
  var rows=[].slice.call(tl.querySelectorAll('.row.r'));
  var totalA=parseFloat(tl.dataset.totalA)||1, totalR=parseFloat(tl.dataset.totalR)||1;
  function fmt(ms){ if(ms===0) return '0'; if(ms>=1000) return (ms/1000).toFixed(3)+' s';
    if(ms>=1) return ms.toFixed(2)+' ms'; return (ms*1000).toFixed(1)+' \u00b5s'; }
  function step(total){ var raw=total/8, mag=Math.pow(10,Math.floor(Math.log10(raw)));
    var ms=[1,2,5,10]; for(var i=0;i<ms.length;i++){ if(raw<=ms[i]*mag) return ms[i]*mag; } return 10*mag; }
  function ticks(){
    var total=mode==='a'?totalA:totalR, ax=document.getElementById('axis-trk'); ax.textContent='';
    var st=step(total);
    for(var n=0;n<100;n++){ var t=n*st; if(t>total+1e-9) break;
      var d=document.createElement('div'); d.className='tick'; d.style.left=(t/total*100)+'%';
      var s=document.createElement('span'); s.textContent=fmt(t); d.appendChild(s); ax.appendChild(d); }
  }
  function layout(){
    var total=mode==='a'?totalA:totalR, key=mode==='a'?'a':'r';
    var els=tl.querySelectorAll('[data-a]');
    for(var i=0;i<els.length;i++){ var el=els[i], x=parseFloat(el.dataset[key]);
      el.style.left=(x/total*100)+'%';
      if(el.dataset.w!==undefined) el.style.width=(parseFloat(el.dataset.w)/total*100)+'%'; }
    ticks();
  }
  function filter(){
    var q=document.getElementById('q').value.toLowerCase(), prob=document.getElementById('prob').checked, shown=0;
    rows.forEach(function(r){ var ok=(!q||r.dataset.rid.toLowerCase().indexOf(q)>=0)&&(!prob||r.dataset.st!=='ok');
      r.classList.toggle('hide',!ok); if(ok) shown++; });
    document.getElementById('shown').textContent=shown+' of '+rows.length+' requests shown';
  }
  function sort(){
    var by=document.getElementById('sort').value;
    var cmp={start:function(a,b){return a.dataset.s-b.dataset.s;},
      dur:function(a,b){return b.dataset.d-a.dataset.d;},
      id:function(a,b){return a.dataset.rid<b.dataset.rid?-1:a.dataset.rid>b.dataset.rid?1:0;},
      status:function(a,b){var o={error:0,aborted:1,ok:2};return (o[a.dataset.st]-o[b.dataset.st])||(a.dataset.s-b.dataset.s);}}[by];
    rows.sort(cmp); rows.forEach(function(r){ tl.appendChild(r); });
  }
  document.getElementById('align').addEventListener('change',function(e){ mode=e.target.checked?'r':'a'; layout(); });
  document.getElementById('zoom').addEventListener('input',function(e){
    tl.style.setProperty('--z',e.target.value); document.getElementById('zv').textContent=e.target.value+'\u00d7'; });
  document.getElementById('q').addEventListener('input',filter);
  document.getElementById('prob').addEventListener('change',filter);
  document.getElementById('sort').addEventListener('change',sort);
  filter(); ticks();
})();
